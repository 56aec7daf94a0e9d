// The parameter-server shard as a gRPC service (ParameterServer in
// proto/dtrain/paramserver.proto) and its client.
//
// Server, per RPC: check the job token first (UNAUTHENTICATED, nothing read or
// changed); Init and Push assemble the streamed chunks into whole slices
// (wire.h: every chunk checked against the shard's slices before anything is
// allocated) and then hand them to the ParameterShard in one call, so a
// malformed or incomplete stream changes nothing; Pull streams the slices
// changed since the given version, chunked below the message limit. The
// streamed messages travel as raw buffers in the protobuf encoding
// (wire_codec.h): tensor data is not copied between the tensors and the
// socket, on either side. gRPC's
// synchronous server runs the handlers on its threads (pollers capped by
// parallelism.async.server_threads, more threads while many RPCs are in
// flight); the shard's per-slice locks let pulls and pushes of different
// workers overlap.
//
// A server started without slices (dtrain-ps) is empty until the chief
// worker's Init: its first message carries a ShardSetup (the shard's part of
// the plan and the LR schedule), from which a new ParameterShard is built and
// initialised; only then does it replace the current one (a failed Init
// changes nothing). Pushes, pulls and Info of an empty shard get
// FAILED_PRECONDITION / initialized = false.
//
// Client: one channel per shard; Push and Pull talk to every shard in
// parallel (one thread per shard) and keep one version per shard. Push sends
// the gradients from the caller's memory and returns only once gRPC has let
// go of it. Under the
// WAIT policy a pull takes the lease on shard 0 first and then reads the
// other shards; a push goes to shard 0 last (shard.h says why).
#pragma once

#include <map>
#include <set>
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
  // Optimizer, staleness and policies of the shard. Empty `slices`: the shard
  // starts empty and learns its slices from the first Init.
  ShardOptions shard;
  std::string bind_address = "127.0.0.1";
  int port = 0;  // 0: pick a free one
  std::string token;
  int threads = 4;
  int max_message_bytes = 64 << 20;
  int64_t chunk_bytes = 4 << 20;  // pull chunks
};

// Makes glibc's malloc keep buffers of up to 256 MiB in its heap instead of
// mapping fresh pages for each one (and returning them at once): every push
// and pull allocates and frees buffers of megabytes, and fresh pages cost a
// page fault and zeroing per 4 KiB. It also keeps every thread on the one
// main heap (M_ARENA_MAX 1): gRPC's threads would otherwise get arenas of
// their own, made of 64 MiB sub-heaps that glibc unmaps when they empty, so
// that received messages kept landing on fresh pages (about 1,000 page faults
// per update in bench_paramserver, 2 workers x 1 shard; none after). One
// heap serialises malloc between threads, which costs nothing measurable in
// these processes: few threads, and large buffers. For the processes that
// move tensors (dtrain-ps, async workers, bench_paramserver);
// docs/benchmarks.md has the effect.
void KeepTransferBuffersInTheHeap();

// The options of shard `shard` of `config`'s parallelism.async (optimizer,
// staleness bound and policies, threads, message and chunk sizes, bind
// address); no slices (the chief's Init brings them).
PsServerOptions PsServerOptionsFromConfig(const JobConfig& config, int shard, const std::string& token);

// The address workers dial for a server bound to `bind_address`: itself, or
// this host's name for 0.0.0.0 / [::].
std::string AdvertisedAddress(const std::string& bind_address, int port);

class PsServer {
 public:
  ~PsServer();
  static Status Start(const PsServerOptions& options, std::unique_ptr<PsServer>* out);
  int port() const;
  // The current shard; null while an empty server awaits its Init.
  std::shared_ptr<ParameterShard> shard();
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
  // This worker's index (sent with pushes; names its WAIT lease).
  int worker = 0;
  AsyncConfig::StalenessPolicy staleness_policy = AsyncConfig::REJECT;
};

// name -> the flattened tensor's floats.
using ConstTensors = std::map<std::string, const float*>;
using Tensors = std::map<std::string, float*>;

struct PsInitOptions {
  // Send each shard its part of the plan and the LR schedule (shard,
  // num_shards and slices are filled in per shard).
  bool send_setup = true;
  ShardSetup setup;
  // Optimizer state by slot name ("momentum_buffer", "exp_avg",
  // "exp_avg_sq"), as on a resume; tensors of the plan.
  std::map<std::string, std::map<std::string, const float*>> slots;
  int64_t optimizer_step = 0;
};

struct PsStateSnapshot {
  int64_t optimizer_step = 0;
  std::set<std::pair<std::string, std::string>> received;  // (slot, tensor)
};

class PsClient {
 public:
  ~PsClient();
  // InvalidArgument when the plan's shard count differs from the addresses'.
  static Status Connect(const PsClientOptions& options, std::unique_ptr<PsClient>* out);

  // Sets every shard's values (all tensors of the plan, sent as float32),
  // version and, with `options`, slices, schedule and optimizer state.
  Status Init(const ConstTensors& values, int64_t version);
  Status Init(const ConstTensors& values, int64_t version, const PsInitOptions& options);
  // Pushes gradients (all tensors of the plan) computed on the parameters of
  // the last Pull; `replies` (may be null) gets each shard's answer. A shard
  // that refuses the push as stale returns Aborted (the caller re-pulls);
  // the other shards may have applied theirs: `statuses` (may be null) gets
  // each shard's outcome, and `only` (may be null) limits the push to the
  // shards marked true (a retry after a partial refusal).
  // `base_versions` (may be null): the shard versions the gradients were
  // computed on, when not those of the last Pull (a prefetching worker).
  Status Push(const ConstTensors& grads, std::vector<PushReply>* replies, std::vector<Status>* statuses = nullptr,
              const std::vector<bool>* only = nullptr, const std::vector<int64_t>* base_versions = nullptr);
  struct PullOptions {
    // WAIT policy: take this worker's lease on shard 0 first (may wait;
    // DeadlineExceeded after timeout_s).
    bool lease = true;
    // Everything, not only what changed since the last pull (for buffers
    // that do not hold the last pull's values).
    bool everything = false;
  };
  // Pulls what changed since the last pull into `params` (everything on the
  // first call) and records each shard's version.
  Status Pull(const Tensors& params) { return Pull(params, PullOptions()); }
  Status Pull(const Tensors& params, const PullOptions& options);
  // Everything, values and optimizer state, for a checkpoint: values into
  // `params`, slots into `slots` (slot -> tensor -> buffer; a slot the shard
  // has but `slots` lacks is an error). Records each shard's version.
  Status PullState(const Tensors& params, const std::map<std::string, Tensors>& slots, PsStateSnapshot* out);
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
