#include "dtrain/paramserver/wire.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "dtrain/common/half.h"

namespace dtrain::paramserver {
namespace {

// Chunks at least this large are copied with streaming stores.
constexpr size_t kStreamingBytes = 1 << 20;

// memcpy for a destination that is not read back soon (pulled values
// bound for a worker's tensors, megabytes each): stores that bypass the
// cache do not read each destination line first, a third of the memory
// traffic of an ordinary copy (the copy of 32 MiB here: 3.9 ms against
// memcpy's 4.8 ms). A fence (EndStreaming) after the last one orders them
// before whatever follows, such as handing the values to another thread.
void StreamingCopy(uint8_t* dst, const uint8_t* src, size_t n) {
#if defined(__SSE2__)
  const size_t head = std::min(n, (16 - reinterpret_cast<uintptr_t>(dst) % 16) % 16);
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  for (; n >= 64; n -= 64, dst += 64, src += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 48), d);
  }
#endif
  std::memcpy(dst, src, n);
}

void EndStreaming() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace

int64_t BytesPerElement(Compression encoding) { return encoding == COMPRESSION_NONE ? 4 : 2; }

void ForEachChunk(const std::string& name, int64_t offset, int64_t length, Compression encoding, int64_t chunk_bytes,
                  const std::function<void(TensorChunk&&, int64_t, int64_t)>& visit) {
  const int64_t per_chunk = std::max<int64_t>(1, chunk_bytes / BytesPerElement(encoding));
  for (int64_t begin = 0; begin < length || (length == 0 && begin == 0); begin += per_chunk) {
    TensorChunk c;
    c.set_name(name);
    c.set_offset(offset);
    c.set_length(length);
    c.set_chunk_offset(begin);
    c.set_encoding(encoding);
    visit(std::move(c), begin, std::min(per_chunk, length - begin));
    if (length == 0) break;
  }
}

void EncodeElements(const float* src, int64_t n, Compression encoding, void* dst) {
  if (encoding == COMPRESSION_NONE) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  auto* out = static_cast<uint8_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = encoding == COMPRESSION_FP16 ? half::FloatToFp16(src[i]) : half::FloatToBf16(src[i]);
    std::memcpy(out + 2 * i, &h, 2);
  }
}

void ChunkSlice(const std::string& name, int64_t offset, const float* data, int64_t length, Compression encoding,
                int64_t chunk_bytes, const std::function<void(TensorChunk&&)>& emit) {
  ForEachChunk(name, offset, length, encoding, chunk_bytes, [&](TensorChunk&& c, int64_t begin, int64_t n) {
    std::string* bytes = c.mutable_data();
    bytes->resize(static_cast<size_t>(n * BytesPerElement(encoding)));
    EncodeElements(data + begin, n, encoding, bytes->data());
    emit(std::move(c));
  });
}

ChunkRef ChunkRef::Of(const TensorChunk& c) {
  ChunkRef r;
  r.name = c.name();
  r.offset = c.offset();
  r.length = c.length();
  r.chunk_offset = c.chunk_offset();
  r.encoding = c.encoding();
  r.slot = c.slot();
  r.size = c.data().size();
  if (r.size > 0) r.pieces.emplace_back(reinterpret_cast<const uint8_t*>(c.data().data()), r.size);
  return r;
}

void ChunkRef::CopyTo(void* dst) const {
  auto* out = static_cast<uint8_t*>(dst);
  const bool streaming = size >= kStreamingBytes;
  for (const auto& [p, n] : pieces) {
    if (streaming) {
      StreamingCopy(out, p, n);
    } else {
      std::memcpy(out, p, n);
    }
    out += n;
  }
  if (streaming) EndStreaming();
}

Status DecodeChunk(const ChunkRef& chunk, float* dst, int64_t* n) {
  const int64_t bpe = BytesPerElement(static_cast<Compression>(chunk.encoding));
  const int64_t size = static_cast<int64_t>(chunk.size);
  if (size % bpe != 0) {
    return Status::InvalidArgument("chunk of '" + chunk.name + "' has " + std::to_string(size) +
                                   " bytes, not a whole number of " + std::to_string(bpe) + "-byte elements");
  }
  *n = size / bpe;
  if (chunk.encoding == COMPRESSION_NONE) {
    chunk.CopyTo(dst);
    return Status::OK();
  }
  // Half precision: an element may straddle two pieces, so decode from one
  // contiguous run.
  std::vector<uint8_t> joined;
  const uint8_t* src = chunk.pieces.empty() ? nullptr : chunk.pieces[0].first;
  if (chunk.pieces.size() > 1) {
    joined.resize(chunk.size);
    chunk.CopyTo(joined.data());
    src = joined.data();
  }
  const bool fp16 = chunk.encoding == COMPRESSION_FP16;
  for (int64_t i = 0; i < *n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    dst[i] = fp16 ? half::Fp16ToFloat(h) : half::Bf16ToFloat(h);
  }
  return Status::OK();
}

SliceAssembler::SliceAssembler(std::function<int64_t(const std::string&, int64_t)> length_of)
    : length_of_(std::move(length_of)) {}

Status SliceAssembler::Add(const ChunkRef& c) {
  const std::string where = "'" + c.name + "' at element " + std::to_string(c.offset) +
                            (c.slot.empty() ? std::string() : " (optimizer slot '" + c.slot + "')");
  const int64_t length = length_of_(c.name, c.offset);
  if (length < 0) return Status::InvalidArgument("no slice " + where + " on this shard (unknown tensor or another shard's part)");
  if (c.length != length) {
    return Status::InvalidArgument("slice " + where + " has " + std::to_string(length) + " elements, the chunk says " +
                                   std::to_string(c.length));
  }
  if (c.encoding != COMPRESSION_NONE && c.encoding != COMPRESSION_FP16 && c.encoding != COMPRESSION_BF16) {
    return Status::InvalidArgument("slice " + where + ": unknown encoding " + std::to_string(c.encoding));
  }
  const int64_t bpe = BytesPerElement(static_cast<Compression>(c.encoding));
  const int64_t n = static_cast<int64_t>(c.size) / bpe;
  if (c.chunk_offset < 0 || c.chunk_offset + n > length) {
    return Status::InvalidArgument("chunk [" + std::to_string(c.chunk_offset) + ", " +
                                   std::to_string(c.chunk_offset + n) + ") lies outside slice " + where + " of " +
                                   std::to_string(length) + " elements");
  }
  Buffer& b = buffers_[{c.name, c.offset, c.slot}];
  b.length = length;
  for (const auto& [lo, hi] : b.filled) {
    if (c.chunk_offset < hi && lo < c.chunk_offset + n) {
      return Status::InvalidArgument("chunks of slice " + where + " overlap at element " +
                                     std::to_string(std::max(lo, c.chunk_offset)));
    }
  }
  if (static_cast<int64_t>(c.size) % bpe != 0) {
    return Status::InvalidArgument("chunk of '" + c.name + "' has " + std::to_string(c.size) +
                                   " bytes, not a whole number of " + std::to_string(bpe) + "-byte elements");
  }
  if (c.encoding == COMPRESSION_NONE) {
    b.runs.emplace_back(c.chunk_offset, c.pieces);
    b.filled.emplace_back(c.chunk_offset, c.chunk_offset + n);
    return Status::OK();
  }
  if (!b.data) b.data.reset(new float[static_cast<size_t>(length)]);
  int64_t got = 0;
  DTRAIN_RETURN_IF_ERROR(DecodeChunk(c, b.data.get() + c.chunk_offset, &got));
  b.filled.emplace_back(c.chunk_offset, c.chunk_offset + got);
  return Status::OK();
}

Status SliceAssembler::Finish(std::vector<SliceView>* out) {
  out->clear();
  for (auto& [key, b] : buffers_) {
    int64_t covered = 0;
    for (const auto& [lo, hi] : b.filled) covered += hi - lo;
    if (covered != b.length) {
      return Status::InvalidArgument("slice '" + std::get<0>(key) + "' at element " + std::to_string(std::get<1>(key)) +
                                     " is incomplete: " + std::to_string(covered) + " of " + std::to_string(b.length) +
                                     " elements sent");
    }
    SliceView v{std::get<0>(key), std::get<1>(key), b.length, nullptr, std::get<2>(key), {}};
    std::sort(b.runs.begin(), b.runs.end(),
              [](const auto& x, const auto& y) { return x.first < y.first; });
    if (b.data) {
      // Some chunks were half precision: join everything in the buffer.
      for (const auto& [begin, pieces] : b.runs) {
        auto* dst = reinterpret_cast<uint8_t*>(b.data.get() + begin);
        for (const auto& [p, n] : pieces) {
          std::memcpy(dst, p, n);
          dst += n;
        }
      }
      v.data = b.data.get();
    } else {
      for (const auto& run : b.runs) v.pieces.insert(v.pieces.end(), run.second.begin(), run.second.end());
      if (v.pieces.size() == 1 && reinterpret_cast<uintptr_t>(v.pieces[0].first) % alignof(float) == 0) {
        v.data = reinterpret_cast<const float*>(v.pieces[0].first);
        v.pieces.clear();
      }
    }
    out->push_back(std::move(v));
  }
  return Status::OK();
}

}  // namespace dtrain::paramserver
