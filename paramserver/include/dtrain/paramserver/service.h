// The parameter-server shard as a gRPC service (ParameterServer in
// proto/dtrain/paramserver.proto) and its client.
//
// Server, per RPC: check the job token first (UNAUTHENTICATED, nothing read or
// changed); Init and Push assemble the streamed chunks into whole slices
// (wire.h: every chunk checked against the shard's slices before anything is
// allocated) and then hand them to the ParameterShard in one call, so a
// malformed or incomplete stream changes nothing; Pull streams the slices
// changed since the given version, chunked below the message limit. gRPC's
// synchronous server runs the handlers on its threads (pollers capped by
// parallelism.async.server_threads, more threads while many RPCs are in
// flight); the shard's per-slice locks let pulls and pushes of different
// workers overlap.
//
// Client: one channel per shard; Push and Pull talk to every shard in
// parallel (one thread per shard) and keep one version per shard.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/job.pb.h"
#include "dtrain/paramserver.pb.h"
#include "dtrain/paramserver/shard.h"
#include "dtrain/paramserver/sharding.h"

namespace dtrain::paramserver {

struct PsServerOptions {
  ShardOptions shard;
  std::string bind_address = "127.0.0.1";
  int port = 0;  // 0: pick a free one
  std::string token;
  int threads = 4;
  int max_message_bytes = 64 << 20;
  int64_t chunk_bytes = 4 << 20;  // pull chunks
};

class PsServer {
 public:
  ~PsServer();
  static Status Start(const PsServerOptions& options, std::unique_ptr<PsServer>* out);
  int port() const;
  ParameterShard& shard();
  void Shutdown();

 private:
  struct Impl;
  PsServer() = default;
  std::unique_ptr<Impl> impl_;
};

struct PsClientOptions {
  std::vector<std::string> addresses;  // one per shard, in shard order
  std::string token;
  ShardPlan plan;
  Compression encoding = COMPRESSION_NONE;
  int64_t chunk_bytes = 4 << 20;
  int max_message_bytes = 64 << 20;
  double timeout_s = 120;
};

// name -> the flattened tensor's floats.
using ConstTensors = std::map<std::string, const float*>;
using Tensors = std::map<std::string, float*>;

class PsClient {
 public:
  ~PsClient();
  // InvalidArgument when the plan's shard count differs from the addresses'.
  static Status Connect(const PsClientOptions& options, std::unique_ptr<PsClient>* out);

  // Sets every shard's values (all tensors of the plan) and version.
  Status Init(const ConstTensors& values, int64_t version);
  // Pushes gradients (all tensors of the plan) computed on the parameters of
  // the last Pull; `replies` (may be null) gets each shard's answer. A shard
  // that refuses the push as stale returns Aborted (the caller re-pulls);
  // the other shards may have applied theirs.
  Status Push(const ConstTensors& grads, std::vector<PushReply>* replies);
  // Pulls what changed since the last pull into `params` (everything on the
  // first call) and records each shard's version.
  Status Pull(const Tensors& params);
  Status Info(int shard, ShardInfo* info);

  const std::vector<int64_t>& versions() const { return versions_; }
  // Bytes sent by Push and received by Pull since Connect (payload only).
  int64_t bytes_pushed() const { return bytes_pushed_; }
  int64_t bytes_pulled() const { return bytes_pulled_; }

 private:
  struct Impl;
  PsClient() = default;
  std::unique_ptr<Impl> impl_;
  std::vector<int64_t> versions_;
  int64_t bytes_pushed_ = 0;
  int64_t bytes_pulled_ = 0;
};

}  // namespace dtrain::paramserver
