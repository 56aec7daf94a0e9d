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

// Bytes per element of an encoding (4, or 2 for fp16/bf16).
int64_t BytesPerElement(Compression encoding);

// Appends the chunks of elements [0, length) of a slice, at most chunk_bytes
// of data each, calling `emit` with each.
void ChunkSlice(const std::string& name, int64_t offset, const float* data, int64_t length, Compression encoding,
                int64_t chunk_bytes, const std::function<void(TensorChunk&&)>& emit);

// Decodes a chunk's data into dst[0, n). InvalidArgument when the size is
// not a whole number of elements.
Status DecodeChunk(const TensorChunk& chunk, float* dst, int64_t* n);

// Collects the chunks of one push (or init) into whole slices, checking each
// against the shard's slices before allocating anything: an unknown slice, a
// wrong length, a chunk outside its slice or overlapping another, or a slice
// left incomplete is an InvalidArgument naming it.
class SliceAssembler {
 public:
  // `length_of(name, offset)` returns the shard's slice length, or -1.
  explicit SliceAssembler(std::function<int64_t(const std::string&, int64_t)> length_of);

  // A float32 chunk that is a whole slice is not copied: its view points
  // into `chunk`, which must then outlive the views Finish() returns (the
  // service keeps every message of a push until it is applied).
  Status Add(const TensorChunk& chunk);
  // The assembled slices (views into this object's buffers or the chunks).
  Status Finish(std::vector<SliceView>* out) const;

 private:
  struct Buffer {
    std::unique_ptr<float[]> data;  // allocated for partial chunks only; not zeroed
    int64_t length = 0;
    const float* borrowed = nullptr;  // a whole float32 chunk, not copied
    std::vector<std::pair<int64_t, int64_t>> filled;  // [begin, end) ranges
  };
  std::function<int64_t(const std::string&, int64_t)> length_of_;
  std::map<std::tuple<std::string, int64_t, std::string>, Buffer> buffers_;  // (name, offset, slot)
};

}  // namespace dtrain::paramserver
