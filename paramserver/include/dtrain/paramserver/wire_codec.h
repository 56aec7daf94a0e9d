// Zero-copy protobuf encoding of the streamed messages of the parameter
// server (InitShardRequest, PushRequest, PullReply in
// proto/dtrain/paramserver.proto), for the service and its client only.
//
// The bytes on the wire are exactly the protobuf encoding of those messages,
// so any protobuf client or server (the generated stub in the tests, another
// language) talks to ours. What differs is who copies:
//
//   - WireBuilder writes the small fields itself and appends each chunk's
//     `data` as a grpc::Slice that points at the caller's memory (a gradient
//     tensor, a snapshot of a shard's values): gRPC hands those slices to the
//     socket as they are.
//   - ParseWireMessage walks the received grpc::ByteBuffer slice by slice and
//     gives each chunk's data as the list of pieces of the received slices
//     that hold it (ChunkRef); nothing is copied until the data reaches its
//     destination (the optimizer, or the worker's parameters).
//
// The generic protobuf path copied each payload three times per direction
// (into a chunk string, into the serialised buffer, out of the parsed
// message); bench/paramserver measures the difference (docs/benchmarks.md).
#pragma once

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/paramserver.pb.h"
#include "dtrain/paramserver/wire.h"

namespace dtrain::paramserver {

// A parsed message: its varint fields (the last value of each number), its
// other length-delimited fields (bytes), and the chunks of field
// `chunks_field`. Fixed-width and unknown fields are skipped.
struct WireMessage {
  std::map<int, uint64_t> varints;
  std::map<int, std::string> bytes;
  std::vector<ChunkRef> chunks;
  std::vector<grpc::Slice> slices;  // keeps the chunks' pieces alive

  int64_t int64(int field, int64_t fallback = 0) const;
  int32_t int32(int field, int32_t fallback = 0) const;
};

// InvalidArgument for a buffer that is not a valid encoding (a truncated
// varint or field, a length past the end, a group, a wire type that does not
// fit a known field).
Status ParseWireMessage(const grpc::ByteBuffer& buffer, int chunks_field, WireMessage* out);

// Writes one message: fields in the order they are added.
class WireBuilder {
 public:
  void Varint(int field, uint64_t value);
  void Int64(int field, int64_t value) { Varint(field, static_cast<uint64_t>(value)); }
  // An embedded message, serialised (copied: for small ones).
  void Message(int field, const google::protobuf::MessageLite& message);
  // A TensorChunk at `field`: `header`'s fields (its data must be empty),
  // then `data` (not copied) as its field 6.
  void Chunk(int field, const TensorChunk& header, grpc::Slice data);
  bool empty() const { return slices_.empty() && pending_.empty(); }
  // The message; the builder is empty again.
  grpc::ByteBuffer Finish();

 private:
  void Tag(int field, int wire_type);
  void Flush();
  std::string pending_;  // small fields not yet in a slice
  std::vector<grpc::Slice> slices_;
};

// A count of grpc::Slices that point at memory the caller must keep (the
// gradients of a push): each slice made by Wrap holds one reference, which
// gRPC drops when it has written the bytes. WaitUntilReleased blocks until
// all are dropped, after which the memory may change.
class SlicePins {
 public:
  SlicePins() = default;
  SlicePins(const SlicePins&) = delete;
  SlicePins& operator=(const SlicePins&) = delete;
  ~SlicePins() { WaitUntilReleased(); }
  grpc::Slice Wrap(const void* data, size_t bytes);
  void WaitUntilReleased();

 private:
  static void Release(void* self);
  std::mutex mu_;
  std::condition_variable cv_;
  int64_t held_ = 0;
};

// A slice that owns a fresh malloc'd buffer of `bytes` (freed when gRPC is
// done with it); `*data` is where to write.
grpc::Slice OwnedSlice(size_t bytes, void** data);

// Makes a slice that points at float32 data in place (and keeps it alive or
// pinned until gRPC is done with it).
using WrapFloats = std::function<grpc::Slice(const float* data, size_t bytes)>;

// Cuts elements [0, length) of a slice into chunks of at most chunk_bytes of
// data and calls emit(header, data, bytes) for each. Float32 data travels in
// place when `wrap` is given; otherwise (or for fp16/bf16) each chunk is a
// fresh copy, encoded as asked.
void ChunkSliceToWire(const std::string& name, int64_t offset, const float* data, int64_t length, Compression encoding,
                      int64_t chunk_bytes, const WrapFloats& wrap,
                      const std::function<void(TensorChunk&& header, grpc::Slice&& data, int64_t bytes)>& emit);

}  // namespace dtrain::paramserver
