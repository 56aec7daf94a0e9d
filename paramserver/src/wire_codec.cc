#include "dtrain/paramserver/wire_codec.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>


namespace dtrain::paramserver {
namespace {

// Protobuf wire types (https://protobuf.dev/programming-guides/encoding/).
constexpr int kVarint = 0;
constexpr int kFixed64 = 1;
constexpr int kLengthDelimited = 2;
constexpr int kFixed32 = 5;

// TensorChunk's field numbers (proto/dtrain/paramserver.proto).
constexpr int kChunkName = 1, kChunkOffset = 2, kChunkLength = 3, kChunkChunkOffset = 4, kChunkEncoding = 5,
              kChunkData = 6, kChunkSlot = 7;

void AppendVarint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

// Reads a message spread over slices, byte by byte or by runs.
class Cursor {
 public:
  explicit Cursor(const std::vector<grpc::Slice>& slices) : slices_(slices) {
    for (const grpc::Slice& s : slices) size_ += s.size();
    Normalize();
  }
  size_t pos() const { return pos_; }
  size_t size() const { return size_; }

  bool Varint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (i_ >= slices_.size()) return false;
      const uint8_t b = slices_[i_].begin()[off_];
      Advance(1);
      *v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;  // more than 10 bytes
  }

  // The next n bytes as pieces of the slices (appended to `pieces` when not
  // null); false when fewer than n are left.
  bool Take(size_t n, std::vector<std::pair<const uint8_t*, size_t>>* pieces) {
    if (n > size_ - pos_) return false;
    while (n > 0) {
      const size_t k = std::min(n, slices_[i_].size() - off_);
      if (pieces) pieces->emplace_back(slices_[i_].begin() + off_, k);
      Advance(k);
      n -= k;
    }
    return true;
  }

  bool String(size_t n, std::string* out) {
    std::vector<std::pair<const uint8_t*, size_t>> pieces;
    if (!Take(n, &pieces)) return false;
    out->clear();
    out->reserve(n);
    for (const auto& [p, k] : pieces) out->append(reinterpret_cast<const char*>(p), k);
    return true;
  }

 private:
  void Advance(size_t k) {
    off_ += k;
    pos_ += k;
    Normalize();
  }
  void Normalize() {
    while (i_ < slices_.size() && off_ >= slices_[i_].size()) {
      off_ = 0;
      ++i_;
    }
  }
  const std::vector<grpc::Slice>& slices_;
  size_t i_ = 0, off_ = 0, pos_ = 0, size_ = 0;
};

Status Malformed(const std::string& what) { return Status::InvalidArgument("malformed message: " + what); }

// Reads a field's tag; InvalidArgument for field 0 and groups.
Status ReadTag(Cursor* c, int* field, int* wire_type) {
  uint64_t tag = 0;
  if (!c->Varint(&tag)) return Malformed("truncated tag at byte " + std::to_string(c->pos()));
  *field = static_cast<int>(tag >> 3);
  *wire_type = static_cast<int>(tag & 7);
  if (*field <= 0) return Malformed("field number 0 at byte " + std::to_string(c->pos()));
  if (*wire_type != kVarint && *wire_type != kFixed64 && *wire_type != kLengthDelimited && *wire_type != kFixed32) {
    return Malformed("field " + std::to_string(*field) + " has wire type " + std::to_string(*wire_type) +
                     " (groups are not used)");
  }
  return Status::OK();
}

// The length of a length-delimited field, checked against `end`.
Status ReadLength(Cursor* c, size_t end, int field, size_t* n) {
  uint64_t len = 0;
  if (!c->Varint(&len)) return Malformed("truncated length of field " + std::to_string(field));
  if (len > end - c->pos()) {
    return Malformed("field " + std::to_string(field) + " says " + std::to_string(len) + " bytes, " +
                     std::to_string(end - c->pos()) + " are left");
  }
  *n = static_cast<size_t>(len);
  return Status::OK();
}

Status SkipField(Cursor* c, size_t end, int field, int wire_type) {
  uint64_t v = 0;
  size_t n = 0;
  switch (wire_type) {
    case kVarint:
      if (!c->Varint(&v)) return Malformed("truncated varint in field " + std::to_string(field));
      return Status::OK();
    case kFixed64:
      n = 8;
      break;
    case kFixed32:
      n = 4;
      break;
    default:
      DTRAIN_RETURN_IF_ERROR(ReadLength(c, end, field, &n));
  }
  if (n > end - c->pos() || !c->Take(n, nullptr)) return Malformed("truncated field " + std::to_string(field));
  return Status::OK();
}

Status ExpectWireType(int field, int wire_type, int expected, const char* what) {
  if (wire_type == expected) return Status::OK();
  return Malformed(std::string(what) + " (field " + std::to_string(field) + ") has wire type " +
                   std::to_string(wire_type) + ", expected " + std::to_string(expected));
}

// One TensorChunk of `n` bytes at the cursor.
Status ParseChunk(Cursor* c, size_t n, ChunkRef* out) {
  const size_t end = c->pos() + n;
  while (c->pos() < end) {
    int field = 0, wt = 0;
    DTRAIN_RETURN_IF_ERROR(ReadTag(c, &field, &wt));
    uint64_t v = 0;
    size_t len = 0;
    switch (field) {
      case kChunkName:
      case kChunkSlot:
        DTRAIN_RETURN_IF_ERROR(ExpectWireType(field, wt, kLengthDelimited, field == kChunkName ? "chunk name" : "chunk slot"));
        DTRAIN_RETURN_IF_ERROR(ReadLength(c, end, field, &len));
        c->String(len, field == kChunkName ? &out->name : &out->slot);
        break;
      case kChunkOffset:
      case kChunkLength:
      case kChunkChunkOffset:
      case kChunkEncoding:
        DTRAIN_RETURN_IF_ERROR(ExpectWireType(field, wt, kVarint, "chunk number"));
        if (!c->Varint(&v)) return Malformed("truncated varint in chunk field " + std::to_string(field));
        if (field == kChunkOffset) out->offset = static_cast<int64_t>(v);
        if (field == kChunkLength) out->length = static_cast<int64_t>(v);
        if (field == kChunkChunkOffset) out->chunk_offset = static_cast<int64_t>(v);
        if (field == kChunkEncoding) out->encoding = static_cast<int>(static_cast<int64_t>(v));
        break;
      case kChunkData:
        DTRAIN_RETURN_IF_ERROR(ExpectWireType(field, wt, kLengthDelimited, "chunk data"));
        DTRAIN_RETURN_IF_ERROR(ReadLength(c, end, field, &len));
        out->pieces.clear();  // the last occurrence wins, as in protobuf
        out->size = len;
        c->Take(len, &out->pieces);
        break;
      default:
        DTRAIN_RETURN_IF_ERROR(SkipField(c, end, field, wt));
    }
  }
  if (c->pos() != end) return Malformed("a field of a chunk runs past the chunk's end");
  return Status::OK();
}

}  // namespace

int64_t WireMessage::int64(int field, int64_t fallback) const {
  auto it = varints.find(field);
  return it == varints.end() ? fallback : static_cast<int64_t>(it->second);
}

int32_t WireMessage::int32(int field, int32_t fallback) const {
  auto it = varints.find(field);
  return it == varints.end() ? fallback : static_cast<int32_t>(static_cast<int64_t>(it->second));
}

Status ParseWireMessage(const grpc::ByteBuffer& buffer, int chunks_field, WireMessage* out) {
  *out = WireMessage();
  if (buffer.Length() > 0) {
    grpc::Status dumped = buffer.Dump(&out->slices);
    if (!dumped.ok()) return Status::Internal("reading a received message: " + dumped.error_message());
  }
  Cursor c(out->slices);
  const size_t end = c.size();
  while (c.pos() < end) {
    int field = 0, wt = 0;
    DTRAIN_RETURN_IF_ERROR(ReadTag(&c, &field, &wt));
    if (wt == kVarint) {
      uint64_t v = 0;
      if (!c.Varint(&v)) return Malformed("truncated varint in field " + std::to_string(field));
      out->varints[field] = v;
    } else if (wt == kLengthDelimited) {
      size_t n = 0;
      DTRAIN_RETURN_IF_ERROR(ReadLength(&c, end, field, &n));
      if (field == chunks_field) {
        out->chunks.emplace_back();
        DTRAIN_RETURN_IF_ERROR(ParseChunk(&c, n, &out->chunks.back()).WithContext("chunk " + std::to_string(out->chunks.size())));
      } else {
        c.String(n, &out->bytes[field]);
      }
    } else {
      DTRAIN_RETURN_IF_ERROR(SkipField(&c, end, field, wt));
    }
  }
  return Status::OK();
}

void WireBuilder::Tag(int field, int wire_type) {
  AppendVarint(static_cast<uint64_t>(field) << 3 | static_cast<uint64_t>(wire_type), &pending_);
}

void WireBuilder::Varint(int field, uint64_t value) {
  Tag(field, kVarint);
  AppendVarint(value, &pending_);
}

void WireBuilder::Message(int field, const google::protobuf::MessageLite& message) {
  Tag(field, kLengthDelimited);
  AppendVarint(message.ByteSizeLong(), &pending_);
  message.AppendToString(&pending_);
}

void WireBuilder::Chunk(int field, const TensorChunk& header, grpc::Slice data) {
  std::string head;
  header.SerializeToString(&head);
  std::string data_tag;
  AppendVarint(static_cast<uint64_t>(kChunkData) << 3 | kLengthDelimited, &data_tag);
  AppendVarint(data.size(), &data_tag);
  Tag(field, kLengthDelimited);
  AppendVarint(head.size() + data_tag.size() + data.size(), &pending_);
  pending_ += head;
  pending_ += data_tag;
  if (data.size() == 0) return;
  Flush();
  slices_.push_back(std::move(data));
}

void WireBuilder::Flush() {
  if (pending_.empty()) return;
  slices_.emplace_back(pending_.data(), pending_.size());  // copies the few bytes
  pending_.clear();
}

grpc::ByteBuffer WireBuilder::Finish() {
  Flush();
  grpc::ByteBuffer out(slices_.data(), slices_.size());
  slices_.clear();
  return out;
}

grpc::Slice SlicePins::Wrap(const void* data, size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++held_;
  }
  return grpc::Slice(const_cast<void*>(data), bytes, &SlicePins::Release, this);
}

void SlicePins::Release(void* self) {
  auto* pins = static_cast<SlicePins*>(self);
  std::lock_guard<std::mutex> lock(pins->mu_);
  --pins->held_;
  pins->cv_.notify_all();
}

void SlicePins::WaitUntilReleased() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return held_ == 0; });
}

grpc::Slice OwnedSlice(size_t bytes, void** data) {
  void* p = std::malloc(std::max<size_t>(bytes, 1));
  if (p == nullptr) throw std::bad_alloc();
  *data = p;
  return grpc::Slice(p, bytes, &std::free);
}

void ChunkSliceToWire(const std::string& name, int64_t offset, const float* data, int64_t length, Compression encoding,
                      int64_t chunk_bytes, const WrapFloats& wrap,
                      const std::function<void(TensorChunk&&, grpc::Slice&&, int64_t)>& emit) {
  ForEachChunk(name, offset, length, encoding, chunk_bytes, [&](TensorChunk&& c, int64_t begin, int64_t n) {
    const size_t bytes = static_cast<size_t>(n * BytesPerElement(encoding));
    grpc::Slice slice;
    if (n > 0 && encoding == COMPRESSION_NONE && wrap) {
      slice = wrap(data + begin, bytes);
    } else if (n > 0) {
      void* dst = nullptr;
      slice = OwnedSlice(bytes, &dst);
      EncodeElements(data + begin, n, encoding, dst);
    }
    emit(std::move(c), std::move(slice), static_cast<int64_t>(bytes));
  });
}

}  // namespace dtrain::paramserver
