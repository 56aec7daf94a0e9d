// Strategy: the seam between the training loop and how workers cooperate.
//
// The trainer owns the model, the loss, the optimizer and the data; a strategy
// owns everything distributed. Sync all-reduce, the async parameter-server
// client and pipeline stages implement this interface; the loop does not change.
//
// Before Setup() the trainer calls Attach() with what a strategy may need
// beyond the tensors (names, optimizer, schedule, the step resumed from).
//
// Per training step the trainer calls, in this order, on every rank:
//   0. BeginStep(): e.g. load parameters pulled ahead;
//   1. takes this rank's batch from a sampler built with data_rank() /
//      data_world_size() (rank() / world_size() unless the ranks of a
//      pipeline replica share their batch);
//   2. forward, then ComputeLoss(): the default evaluates the loss on the local
//      batch; a strategy may all-gather embeddings first (global mining);
//   3. backward (a strategy may have registered gradient hooks in Setup() to
//      start communication while backward runs). A strategy that
//      RunsForwardBackward() does 2 and 3 itself in ForwardBackward() (the
//      pipeline: each rank holds only some layers);
//   4. FinishGradients(): gradients are final after it returns (e.g. averaged
//      across ranks);
//   5. gradient clipping, if configured;
//   6. ApplyUpdate(): the default steps the local optimizer; an async strategy
//      pushes gradients and pulls parameters instead. It may ask for the step
//      to be computed again on the same batch (*recompute: the parameter
//      server refused the gradients as too stale and fresh parameters were
//      pulled); the trainer then repeats 2-6;
//   7. AverageAcrossWorkers() for figures that are logged.
// Setup() is called once, after the model and loss exist (and after a resume
// restored them), before the first step; Finish() once after the last step,
// before the final checkpoint. Every rank calls PrepareCheckpoint() before the
// chief snapshots a checkpoint: a strategy whose parameters live elsewhere
// brings the chief's model and optimizer state up to date (the other ranks
// take part where that needs them, e.g. a pipeline's stages).
//
// Thread-safety: all calls come from the training thread.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "dtrain/common/lr_schedule.h"
#include "dtrain/common/metrics_log.h"
#include "dtrain/common/status.h"
#include "dtrain/job.pb.h"
#include "dtrain/models/embedder.h"
#include "dtrain/models/loss.h"

namespace dtrain::worker {

// What the trainer tells a strategy before Setup().
struct TrainingContext {
  // Checkpoint names of Setup()'s parameters, in the same order
  // ("model/<name>", "loss/<name>", worker/checkpointing.h).
  std::vector<std::string> parameter_names;
  torch::optim::Optimizer* optimizer = nullptr;
  OptimizerConfig::Kind optimizer_kind = OptimizerConfig::SGD;
  // The job's LR schedule over this worker's steps.
  LrScheduleOptions schedule;
  // The step training starts at (the checkpoint's on a resume, else 0).
  int64_t start_step = 0;
  bool resumed = false;
  // The trainer's model and loss (a pipeline cuts the model into stages).
  models::EmbedderImpl* model = nullptr;
  models::LossModuleImpl* loss = nullptr;
};

class Strategy {
 public:
  virtual ~Strategy() = default;

  // "local", "sync", "async", "pipeline".
  virtual const char* name() const = 0;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // The rank that writes metrics, evaluation and checkpoints.
  bool is_chief() const { return rank() == 0; }
  // Which share of the data this rank reads (step 1), and of how many.
  virtual int data_rank() const { return rank(); }
  virtual int data_world_size() const { return world_size(); }

  // Whether the job's steps are shared among the ranks (async with
  // share_work): the trainer then runs until JobStep() reaches the job's
  // total instead of counting its own steps, and checkpoints JobStep().
  virtual bool SharesSteps() const { return false; }
  // The job's step as this rank knows it (only asked when SharesSteps()).
  virtual int64_t JobStep() const { return 0; }

  virtual void Attach(const TrainingContext& context) {}
  virtual Status Setup(const std::vector<torch::Tensor>& parameters, const std::vector<torch::Tensor>& buffers) {
    return Status::OK();
  }
  virtual Status BeginStep() { return Status::OK(); }
  virtual Status ComputeLoss(models::LossModuleImpl& loss, const torch::Tensor& embeddings,
                             const torch::Tensor& labels, models::LossOutput* out);
  // Steps 2 and 3 in one, for a strategy that RunsForwardBackward(): the
  // gradients of the step are in the parameters afterwards, and *out holds
  // the loss (its value; no graph) and the active fraction.
  virtual bool RunsForwardBackward() const { return false; }
  virtual Status ForwardBackward(const torch::Tensor& images, const torch::Tensor& labels, models::LossOutput* out) {
    return Status::Internal(std::string(name()) + " does not run forward and backward itself");
  }
  virtual Status FinishGradients() { return Status::OK(); }
  virtual Status ApplyUpdate(torch::optim::Optimizer& optimizer, bool* recompute);
  virtual Status PrepareCheckpoint() { return Status::OK(); }
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
