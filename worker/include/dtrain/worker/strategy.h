// Strategy: the seam between the training loop and how workers cooperate.
//
// The trainer owns the model, the loss, the optimizer and the data; a strategy
// owns everything distributed. Sync all-reduce, the async parameter-server
// client and pipeline stages implement this interface; the loop does not change.
//
// Per training step the trainer calls, in this order, on every rank:
//   1. takes this rank's batch from a sampler built with rank() / world_size();
//   2. forward, then ComputeLoss(): the default evaluates the loss on the local
//      batch; a strategy may all-gather embeddings first (global mining);
//   3. backward (a strategy may have registered gradient hooks in Setup() to
//      start communication while backward runs);
//   4. FinishGradients(): gradients are final after it returns (e.g. averaged
//      across ranks);
//   5. gradient clipping, if configured;
//   6. ApplyUpdate(): the default steps the local optimizer; an async strategy
//      pushes gradients and pulls parameters instead;
//   7. AverageAcrossWorkers() for figures that are logged.
// Setup() is called once, after the model and loss exist (and after a resume
// restored them), before the first step; Finish() once after the last.
//
// Thread-safety: all calls come from the training thread.
#pragma once

#include <torch/torch.h>

#include <vector>

#include "dtrain/common/metrics_log.h"
#include "dtrain/common/status.h"
#include "dtrain/models/loss.h"

namespace dtrain::worker {

class Strategy {
 public:
  virtual ~Strategy() = default;

  // "local", "sync", "async", "pipeline".
  virtual const char* name() const = 0;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // The rank that writes metrics, evaluation and checkpoints.
  bool is_chief() const { return rank() == 0; }

  virtual Status Setup(const std::vector<torch::Tensor>& parameters, const std::vector<torch::Tensor>& buffers) {
    return Status::OK();
  }
  virtual Status ComputeLoss(models::LossModuleImpl& loss, const torch::Tensor& embeddings,
                             const torch::Tensor& labels, models::LossOutput* out);
  virtual Status FinishGradients() { return Status::OK(); }
  virtual Status ApplyUpdate(torch::optim::Optimizer& optimizer);
  virtual double AverageAcrossWorkers(double value) { return value; }
  // Adds this strategy's per-step figures (communication time, staleness, ...)
  // to the record written to metrics.jsonl.
  virtual void AddStepMetrics(MetricsLog::Record* record) {}
  virtual Status Finish() { return Status::OK(); }
};

// One worker, no communication.
class LocalStrategy : public Strategy {
 public:
  const char* name() const override { return "local"; }
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
};

}  // namespace dtrain::worker
