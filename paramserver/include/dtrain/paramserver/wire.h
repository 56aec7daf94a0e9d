// Tensor slices on the wire (proto/dtrain/paramserver.proto TensorChunk):
// float32, or fp16 / bf16 when the job asks for a compressed transport
// (parallelism.async.transport), cut into chunks of at most chunk_bytes.
//
// Thread-safety: free functions share no state; a SliceAssembler is used by
// one thread.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/job.pb.h"
#include "dtrain/paramserver.pb.h"
#include "dtrain/paramserver/shard.h"

namespace dtrain::paramserver {

// One TensorChunk as it arrived: its fields, and its data as the pieces of
// the received buffers that hold it (service.cc parses the wire without
// copying; wire_codec.h), valid while those buffers live.
struct ChunkRef {
  std::string name;
  int64_t offset = 0;
  int64_t length = 0;
  int64_t chunk_offset = 0;
  int encoding = COMPRESSION_NONE;  // a Compression value, not yet checked
  std::string slot;
  std::vector<std::pair<const uint8_t*, size_t>> pieces;
  size_t size = 0;  // bytes of data in all

  // The chunk of a parsed protobuf message (one piece pointing into it).
  static ChunkRef Of(const TensorChunk& c);
  // Copies the data to dst[0, size).
  void CopyTo(void* dst) const;
};

// Bytes per element of an encoding (4, or 2 for fp16/bf16).
int64_t BytesPerElement(Compression encoding);

// Visits the chunks of elements [0, length) of a slice, at most chunk_bytes
// of data each: visit(header, begin, n) gets the chunk's fields (its data
// empty) and its elements [begin, begin + n). A slice of no elements has one
// empty chunk.
void ForEachChunk(const std::string& name, int64_t offset, int64_t length, Compression encoding, int64_t chunk_bytes,
                  const std::function<void(TensorChunk&& header, int64_t begin, int64_t n)>& visit);

// Writes src[0, n) in the encoding to dst (n x BytesPerElement bytes).
void EncodeElements(const float* src, int64_t n, Compression encoding, void* dst);

// Appends the chunks of elements [0, length) of a slice, at most chunk_bytes
// of data each, calling `emit` with each.
void ChunkSlice(const std::string& name, int64_t offset, const float* data, int64_t length, Compression encoding,
                int64_t chunk_bytes, const std::function<void(TensorChunk&&)>& emit);

// Decodes a chunk's data into dst[0, n). InvalidArgument when the size is
// not a whole number of elements.
Status DecodeChunk(const ChunkRef& chunk, float* dst, int64_t* n);
inline Status DecodeChunk(const TensorChunk& chunk, float* dst, int64_t* n) { return DecodeChunk(ChunkRef::Of(chunk), dst, n); }

// Collects the chunks of one push (or init) into whole slices, checking each
// against the shard's slices before allocating anything: an unknown slice, a
// wrong length, a chunk outside its slice or overlapping another, or a slice
// left incomplete is an InvalidArgument naming it.
class SliceAssembler {
 public:
  // `length_of(name, offset)` returns the shard's slice length, or -1.
  explicit SliceAssembler(std::function<int64_t(const std::string&, int64_t)> length_of);

  // Float32 chunks are not copied: the views point into the chunks' buffers
  // (SliceView::pieces, or data for a slice in one aligned piece), which must
  // then outlive the views Finish() returns (the service keeps every message
  // of a push until it is applied). Half-precision chunks are decoded.
  Status Add(const ChunkRef& chunk);
  Status Add(const TensorChunk& chunk) { return Add(ChunkRef::Of(chunk)); }
  // The assembled slices (views into this object's buffers or the chunks).
  Status Finish(std::vector<SliceView>* out);

 private:
  using Pieces = std::vector<std::pair<const uint8_t*, size_t>>;
  struct Buffer {
    std::unique_ptr<float[]> data;  // decoded half-precision chunks; not zeroed
    int64_t length = 0;
    std::vector<std::pair<int64_t, Pieces>> runs;  // float32 chunks by first element, not copied
    std::vector<std::pair<int64_t, int64_t>> filled;  // [begin, end) ranges
  };
  std::function<int64_t(const std::string&, int64_t)> length_of_;
  std::map<std::tuple<std::string, int64_t, std::string>, Buffer> buffers_;  // (name, offset, slot)
};

}  // namespace dtrain::paramserver
