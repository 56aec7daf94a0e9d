// The pipeline strategy: pipelined model parallelism in the trainer loop
// (docs/pipeline.md), on the engine of pipeline.h.
//
// N = D x S ranks: D replicas of an S-stage pipeline. Rank r is stage
// r mod S of replica r / S; the stages of a replica are consecutive ranks.
//
// Per step, on every rank (the trainer's protocol, strategy.h):
//   1. Every stage of replica d reads the same batch: the sampler is built
//      with data_rank() = d and data_world_size() = D, so the replicas
//      share out the data as D sync workers would.
//   2. ForwardBackward(): the stage runs its part of the mini-batch
//      (StageExecutor::RunMiniBatch, with the schedule of
//      parallelism.pipeline); then one all-reduce over all ranks gives every
//      rank the mean loss of the D replicas (the last stages know it).
//   3. With D > 1, each stage's gradients are averaged within its
//      data-parallel group (the D ranks holding that stage; a
//      sub-communicator split by stage), and so are its BatchNorm running
//      statistics (as the sync strategy averages them), so the replicas stay
//      identical. The reduction starts as soon as the stage's last backward
//      is done (in ForwardBackward, before the loss reduction);
//      FinishGradients() waits for it.
//   4. The trainer's optimizer steps every parameter that has a gradient:
//      exactly this stage's (the others keep none).
//
// Setup: rank 0 partitions the model (parallelism.pipeline.layers_per_stage,
// or AUTO: forward+backward time per layer measured on one micro-batch) and
// broadcasts the cut, so that every rank uses the same one; rank 0 prints it.
//
// Checkpoints and the final model (one writer: rank 0, the chief):
// PrepareCheckpoint() and Finish() run on every rank; stages 1..S-1 of
// replica 0 send rank 0 their parameters, BatchNorm buffers and optimizer
// state (per parameter: a mask of the slots present, then each slot), in a
// fixed order both sides derive from the partition. Rank 0 then holds the
// whole model and optimizer state and writes the usual mode-independent
// checkpoint, so a pipeline checkpoint resumes in sync or async mode or at
// another S, and a sync one as a pipeline (every rank loads it whole).
//
// Losses: ArcFace and CosFace per micro-batch (their mean over the
// mini-batch is the same). Triplet: under GPipe the last stage mines over
// the whole mini-batch (StageOptions::whole_batch_loss); under 1F1B each
// micro-batch mines its own triplets, so with the PK sampler
// data.pk_classes must be a multiple of the micro-batches (each micro-batch
// then holds whole classes, K images of each).
//
// Refused (FailedPrecondition, naming the field): optimizer.grad_clip_norm
// (it needs the norm over every stage), triplet mining over the global batch
// of several workers (mining_scope GLOBAL), micro-batches of fewer than 2
// samples (the embedding head's BatchNorm), a PK batch that 1F1B's
// micro-batches would cut through a class.
//
// Thread-safety: all calls come from the training thread.
#pragma once

#include <memory>

#include "dtrain/worker/collective/collective.h"
#include "dtrain/worker/strategy.h"

namespace dtrain::worker {

struct PipelineStrategyOptions {
  // Every rank of the job (stages x replicas).
  std::unique_ptr<collective::Collective> world;
  // The ranks holding the same stage (D of them); null when D == 1.
  std::unique_ptr<collective::Collective> stage_group;
  PipelineConfig config;
  // The per-replica mini-batch (data.batch_size).
  int64_t batch = 0;
};

class PipelineStrategy : public Strategy {
 public:
  explicit PipelineStrategy(PipelineStrategyOptions options);
  ~PipelineStrategy() override;

  const char* name() const override { return "pipeline"; }
  int rank() const override;
  int world_size() const override;
  int data_rank() const override;
  int data_world_size() const override;

  void Attach(const TrainingContext& context) override;
  Status Setup(const std::vector<torch::Tensor>& parameters, const std::vector<torch::Tensor>& buffers) override;
  bool RunsForwardBackward() const override { return true; }
  Status ForwardBackward(const torch::Tensor& images, const torch::Tensor& labels, models::LossOutput* out) override;
  Status FinishGradients() override;
  Status PrepareCheckpoint() override;
  double AverageAcrossWorkers(double value) override { return value; }
  void AddStepMetrics(MetricsLog::Record* record) override;
  Status Finish() override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Checks what the pipeline strategy cannot do (see above) for `config`.
Status CheckPipelineConfig(const JobConfig& config);

}  // namespace dtrain::worker
