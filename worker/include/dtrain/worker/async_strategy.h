// AsyncStrategy: asynchronous parameter-server data parallelism
// (parallelism.async; the shards are paramserver/, docs/paramserver.md).
//
// Workers never wait for each other: each one pulls the parameters from the
// S shards, computes gradients on its own batches and pushes them; the shards
// apply every push with the server-side optimizer and the job's LR schedule.
//
// Protocol of one worker:
//   1. Setup(): the shard plan is computed from the parameters' names and
//      sizes (paramserver/sharding.h; every worker computes the same plan).
//      The chief sends every shard its slices, the schedule, the parameters
//      and, on a resume, the optimizer state (Init) at version
//      start_step x workers; the workers then meet at a barrier, and every
//      worker pulls the full parameters.
//   2. Without prefetch, a step is: pull (BeginStep), compute, push (tagged
//      with the versions the parameters came from). The schedule's rate is
//      scaled by 1/N per push (parallelism.async.scale_lr). A shard
//      that refuses the push as more than max_staleness updates stale makes
//      the step compute again on freshly pulled parameters (ApplyUpdate's
//      *recompute), pushing only to the shards that refused. Under the WAIT
//      policy the pull takes a lease first (paramserver/shard.h), so pushes
//      are never refused.
//   3. With prefetch (off by default; REJECT, max_staleness >= 1 only): one
//      communication thread runs, in order, the pull of the next step's
//      parameters (queued when a step begins) and the push of this step's
//      gradients (queued at its end), so both overlap the computation. A prefetched push that is
//      refused as stale is dropped and counted: its step has passed.
//   4. Checkpoints (chief, PrepareCheckpoint): the shards' values and
//      optimizer state are pulled into the model and the local optimizer, so
//      the trainer writes them in the mode-independent checkpoint format
//      (worker/checkpointing.h). The chief's BatchNorm running statistics go
//      with them (each worker keeps its own; they are not sent to shards).
//   5. Finish(): every worker waits for the others (barrier), then the chief
//      pulls the final parameters, and writes the shards' counters
//      (staleness histograms) to `stats_path`.
//   6. share_work: the job's step is the updates the shards have applied
//      divided by the workers (the highest version any push reply or pull
//      reported); every worker trains until it reaches the job's total, so
//      a fast worker takes more steps than a slow one and they reach Finish
//      together (each overshoots by at most the step it had in flight).
//
// Thread-safety: driven by the training thread; with prefetch, one thread of
// its own talks to the shards.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "dtrain/job.pb.h"
#include "dtrain/worker/collective/collective.h"
#include "dtrain/worker/strategy.h"

namespace dtrain::worker {

struct AsyncStrategyOptions {
  // The shards' addresses, in shard order.
  std::vector<std::string> addresses;
  std::string token;
  AsyncConfig config;
  // The workers among themselves (barriers only); null for one worker.
  std::unique_ptr<collective::Collective> workers;
  // Where the chief writes the shards' counters at the end ("" = nowhere).
  std::string stats_path;
};

class AsyncStrategy : public Strategy {
 public:
  explicit AsyncStrategy(AsyncStrategyOptions options);
  ~AsyncStrategy() override;

  const char* name() const override { return "async"; }
  int rank() const override;
  int world_size() const override;

  bool SharesSteps() const override;
  int64_t JobStep() const override;
  void Attach(const TrainingContext& context) override;
  Status Setup(const std::vector<torch::Tensor>& parameters, const std::vector<torch::Tensor>& buffers) override;
  Status BeginStep() override;
  Status ApplyUpdate(torch::optim::Optimizer& optimizer, bool* recompute) override;
  Status PrepareCheckpoint() override;
  void AddStepMetrics(MetricsLog::Record* record) override;
  Status Finish() override;

  struct Totals {
    int64_t pushes = 0;           // accepted by every shard
    int64_t recomputes = 0;       // steps computed again after a refusal
    int64_t dropped_stale = 0;    // prefetched pushes refused as stale
    int64_t max_staleness_seen = 0;
    double staleness_sum = 0;     // over accepted pushes (shard 0's figure)
    double wait_seconds = 0;      // training thread blocked on the shards
    int64_t bytes_pushed = 0;
    int64_t bytes_pulled = 0;
  };
  Totals totals() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dtrain::worker
