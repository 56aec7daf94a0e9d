// The training loop: data -> forward -> loss -> backward -> optimizer step,
// for the embedders (ArcFace, CosFace, triplet) on Fashion-MNIST.
//
// How workers cooperate is the Strategy's business (strategy.h); the loop is
// the same for one local worker, sync all-reduce, async parameter servers and
// pipeline stages.
//
// Outputs in the run directory (written by the chief rank only):
//   config.textproto  the resolved config
//   metrics.jsonl     one line every training.log_every_steps steps
//   model.pt          the final embedder (torch::save), for `dtrain eval`
//   store/            checkpoints (checkpoint.dir; common/checkpoint_store.h),
//                     written by the chief: every checkpoint.every_steps steps,
//                     at the end of every checkpoint.every_epochs epochs and at
//                     the end; on a background thread when checkpoint.async_save
//   eval.json         retrieval metrics of the model and the raw-pixel baseline
//
// Thread-safety: a Trainer is driven by one thread; it runs one background
// thread of its own that prepares batches ahead.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>

#include "dtrain/common/retrieval_metrics.h"
#include "dtrain/common/status.h"
#include "dtrain/job.pb.h"
#include "dtrain/models/embedder.h"
#include "dtrain/models/loss.h"
#include "dtrain/worker/strategy.h"

namespace dtrain::worker {

// Where training stands, for the coordinator's heartbeats.
struct TrainProgress {
  int64_t step = 0;
  int64_t total_steps = 0;
  double epoch = 0;
  // Mean loss and this worker's images/s over the last logged interval.
  double loss = 0;
  double images_per_sec = 0;
  // "training", "checkpointing", "evaluating", "done".
  const char* phase = "training";
};

struct TrainerOptions {
  // Write config.textproto, metrics.jsonl, model.pt and eval.json (chief only).
  // Default: true.
  bool write_outputs = true;
  // Show a progress bar (or periodic log lines when not on a terminal).
  // Default: true; the job's training.progress_bar can turn it off too.
  bool progress = true;
  // Evaluate on the test split at the end (also subject to eval.at_end).
  // Default: true.
  bool evaluate = true;
  // Continue from the newest intact checkpoint of checkpoint.dir (falling
  // back past corrupt ones, with a warning); a fresh start when the store is
  // empty. Default: false.
  bool resume = false;
  // Use a checkpoint store created by another job or for another model/loss
  // config (refused otherwise, naming both). Default: false.
  bool force_store = false;
  // Stop (as if interrupted) after this many steps in all, without the final
  // checkpoint or evaluation; 0 = run to the end. For tests and benchmarks.
  int64_t stop_after_steps = 0;
  // Called on the training thread after every step and at every change of
  // phase (dtrain-worker passes it to the coordinator). Must be cheap.
  std::function<void(const TrainProgress&)> on_progress;
};

struct TrainResult {
  int64_t steps = 0;
  // Step the run resumed from (0 for a fresh start).
  int64_t resumed_from_step = 0;
  int64_t epochs_completed = 0;
  int64_t checkpoints_saved = 0;
  double train_seconds = 0;
  // Images per second over the whole run, summed over workers.
  double images_per_sec = 0;
  // Mean training loss over the last logged interval.
  double final_loss = 0;
  bool evaluated = false;
  RetrievalMetrics model_metrics;
  RetrievalMetrics raw_pixel_metrics;
};

class Trainer {
 public:
  // Builds the model, loss, optimizer and data for `config` (already
  // validated, defaults filled). Errors: unknown model or loss names, a
  // missing or corrupt dataset, a sampler that cannot be built.
  static Status Create(const JobConfig& config, std::unique_ptr<Strategy> strategy, TrainerOptions options,
                       std::unique_ptr<Trainer>* out);
  ~Trainer();

  // Trains to the configured length, then evaluates (chief). Fails when the
  // loss stops being finite, naming the step.
  Status Run(TrainResult* result);

  models::Embedder model() const;
  // The loss module (ArcFace/CosFace class weights live there).
  std::shared_ptr<models::LossModuleImpl> loss() const;
  const JobConfig& config() const;

 private:
  struct Impl;
  explicit Trainer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The optimizer of `config` (SGD with momentum or AdamW) over `params`.
std::unique_ptr<torch::optim::Optimizer> MakeOptimizer(const OptimizerConfig& config,
                                                       const std::vector<torch::Tensor>& params);

// Evaluates `model` on the Fashion-MNIST test split of `config` (leave-one-out)
// and the raw-pixel baseline beside it.
Status EvaluateOnTestSplit(const JobConfig& config, models::EmbedderImpl& model, RetrievalMetrics* model_metrics,
                           RetrievalMetrics* raw_pixel_metrics);

// eval.json text for the two metric sets.
std::string EvalJson(const JobConfig& config, const RetrievalMetrics& model_metrics,
                     const RetrievalMetrics& raw_pixel_metrics, const TrainResult* training);

// The evaluation table printed at the end of training and by `dtrain eval`.
std::string EvalTable(const RetrievalMetrics& model_metrics, const RetrievalMetrics& raw_pixel_metrics);

// Saves / loads a model's parameters and buffers (model.pt; an embedder or
// the detector). The file
// also carries `config` (text format, under kModelConfigKey), so that a model
// file alone is enough to rebuild its embedder (the indexer relies on it).
// LoadModel ignores it.
inline constexpr const char* kModelConfigKey = "__dtrain_model_config__";
Status SaveModel(torch::nn::Module& model, const ModelConfig& config, const std::string& path);
Status LoadModel(const std::string& path, torch::nn::Module& model);

// The ModelConfig a model file carries. NotFound when it carries none (a file
// written before dtrain stored it); Corruption when it cannot be read.
Status ReadModelConfig(const std::string& path, ModelConfig* config);

// The model of the newest good checkpoint of the store at `store_dir`
// (corrupt checkpoints are skipped, with a warning each in `warnings`):
// loads its "model/..." tensors into `model`, which must be built from the
// same config. *step receives the checkpoint's step.
Status LoadModelFromCheckpoint(const std::string& store_dir, torch::nn::Module& model, int64_t* step,
                               std::vector<std::string>* warnings);

}  // namespace dtrain::worker
