// SyncStrategy: synchronous all-reduce data parallelism (parallelism.sync).
//
// Every rank holds a full replica of the model and the optimizer, reads its own
// shard of each global batch (data/sampler.h), and after backward all ranks hold
// the same averaged gradients, so their optimizer steps keep the replicas equal.
//
// Gradient reducer (the protocol of one step, on every rank):
//   1. Setup(): parameters are cut into buckets of about bucket_bytes, walking
//      them in reverse registration order (backward produces gradients roughly
//      in that order); a bucket never mixes dtypes. Parameters and buffers are
//      broadcast from rank 0, so all replicas start equal (also after a resume).
//   2. backward: a hook on each parameter copies its gradient into its bucket's
//      flat buffer and counts it ready. When a bucket is complete and every
//      bucket before it has been launched, its all-reduce is launched: the
//      Collective's communication thread runs it while backward goes on
//      (overlap). Buckets are launched strictly in index order on every rank,
//      whatever order the hooks fire in: that is the Collective's ordering
//      contract.
//   3. FinishGradients(): buckets whose parameters got no gradient this step
//      are completed with zeros and launched; the BatchNorm running statistics
//      are averaged (one small all-reduce); then every bucket is waited on and
//      its averaged values are written back into the parameters' .grad.
//   4. The trainer clips and steps the optimizer locally: identical on all ranks.
//
// With overlap = false the hooks are not installed and step 3 copies every
// gradient and launches all buckets at once (the baseline that the scaling
// benchmark compares against).
//
// BatchNorm: the forward normalises with each rank's local batch statistics
// (as PyTorch DDP without SyncBatchNorm); the running mean and variance are
// all-reduce averaged after every step, so every replica holds the same
// running statistics: the mean over ranks of the per-rank EMAs. The
// checkpoint and the evaluated model (rank 0's) therefore reflect the data of
// every rank. The variance so averaged omits the spread of the per-rank means
// (a small underestimate when ranks' batches differ; none in expectation for
// shuffled shards).
//
// Global mining (loss.triplet.mining_scope: GLOBAL): ComputeLoss all-gathers
// the embeddings and labels of every rank, replaces this rank's rows with its
// own (differentiable) embeddings and evaluates the loss on the whole global
// batch, so the miner sees W x B samples. Every rank then computes the same
// loss value, but its gradient reaches only the local rows; the reducer
// therefore SUMS (instead of averaging) the gradients, which gives exactly the
// gradient of the global loss.
//
// Errors: a collective that fails or times out makes the step fail with the
// Collective's message (operation, bucket, ranks that had not arrived); the
// caller must then end the process (Collective::Abort) because the other
// ranks cannot continue.
//
// Thread-safety: driven by the training thread; the hooks run on the autograd
// thread of backward (the training thread on CPU).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "dtrain/job.pb.h"
#include "dtrain/worker/collective/collective.h"
#include "dtrain/worker/strategy.h"

namespace dtrain::worker {

struct SyncStrategyOptions {
  // Target bucket size in bytes. Default: 25 MiB.
  int64_t bucket_bytes = 25 << 20;
  // Launch buckets during backward. Default: true.
  bool overlap = true;
  // Wire type of the gradient all-reduce. Default: native (fp32).
  collective::WireType compression = collective::WireType::kNative;
  // All-gather embeddings for the triplet miner (see above). Default: false.
  bool global_mining = false;
  // Average the BatchNorm running statistics after every step. Default: true.
  bool sync_buffers = true;
};

// The buckets for parameters of `bytes[i]` bytes and dtype ids `dtype[i]`, in
// registration order: each bucket lists parameter indices in reverse
// registration order; a bucket is closed once it holds >= cap_bytes or when
// the next parameter has another dtype. Every parameter is in exactly one
// bucket.
std::vector<std::vector<size_t>> AssignBuckets(const std::vector<int64_t>& bytes, const std::vector<int>& dtype,
                                               int64_t cap_bytes);

// Options of a job config's parallelism.sync (plus loss.triplet.mining_scope).
SyncStrategyOptions SyncOptionsFromConfig(const JobConfig& config);

class SyncStrategy : public Strategy {
 public:
  // `collective` spans every worker of the job; ownership is taken.
  SyncStrategy(std::unique_ptr<collective::Collective> collective, SyncStrategyOptions options);
  ~SyncStrategy() override;

  const char* name() const override { return "sync"; }
  int rank() const override;
  int world_size() const override;

  Status Setup(const std::vector<torch::Tensor>& parameters, const std::vector<torch::Tensor>& buffers) override;
  Status ComputeLoss(models::LossModuleImpl& loss, const torch::Tensor& embeddings, const torch::Tensor& labels,
                     models::LossOutput* out) override;
  Status FinishGradients() override;
  double AverageAcrossWorkers(double value) override;
  void AddStepMetrics(MetricsLog::Record* record) override;
  Status Finish() override;

  // The buckets chosen in Setup() (parameter indices into Setup's list).
  const std::vector<std::vector<size_t>>& buckets() const;
  collective::Collective& collective();

  // Totals since Setup(), for benchmarks and tests.
  struct Totals {
    int64_t steps = 0;
    double comm_seconds = 0;  // sum over buckets of launch-to-completion time
    double wait_seconds = 0;  // time FinishGradients() blocked waiting for them
    int64_t buckets_launched = 0;
    int64_t buckets_launched_in_backward = 0;  // by a hook, before FinishGradients()
  };
  Totals totals() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dtrain::worker
