// Training and evaluating the snap detector (models/detector.h) with the same
// strategies, checkpoint store and run directory as the embedders.
//
// A detector job is a JobConfig whose model.name is "centernet_detector" and
// data.dataset "fashion_mnist_snaps". Training snaps are generated on the fly
// from the train split (data/snaps.h): step s of epoch e reads the snaps with
// keys e * train_count + i for the sampler's indices i, so every epoch sees
// new snaps and a resumed job sees exactly the snaps it would have seen
// (or, with data.snaps.train_dir, the snaps of that COCO directory).
// Evaluation snaps come from the test split with data.snaps.eval_seed (or
// data.snaps.eval_dir).
//
// The loop follows worker/strategy.h (local and sync strategies; the async
// and pipeline strategies are embedder-only and refused with a message).
// Checkpoints use the embedders' layout ("model/...", "optim/model/...",
// the "trainer" section; worker/checkpointing.h) with no loss tensors.
//
// Outputs (chief): config.textproto, metrics.jsonl, model.pt (with its
// ModelConfig, like the embedders'), eval.json with the detection metrics and
// eval_snaps.png (8 evaluation snaps with true and detected boxes).
#pragma once

#include <string>
#include <vector>

#include "dtrain/common/detection_metrics.h"
#include "dtrain/common/status.h"
#include "dtrain/data/snaps.h"
#include "dtrain/job.pb.h"
#include "dtrain/models/detector.h"
#include "dtrain/worker/strategy.h"
#include "dtrain/worker/trainer.h"

namespace dtrain::worker {

struct DetectorTrainResult {
  int64_t steps = 0;
  int64_t resumed_from_step = 0;
  double train_seconds = 0;
  double images_per_sec = 0;  // snaps per second, all workers
  double final_loss = 0;
  bool evaluated = false;
  DetectionMetrics metrics;
};

// Trains the detector of `config` (validated, defaults filled) with
// `strategy`, then evaluates it on the evaluation snaps (chief, eval.at_end).
// Options as for the embedders' Trainer.
Status TrainDetector(const JobConfig& config, std::unique_ptr<Strategy> strategy, const TrainerOptions& options,
                     DetectorTrainResult* result);

// The evaluation snaps of `config`: data.snaps.eval_dir when set, else
// data.snaps.eval_count snaps generated from the test split.
Status LoadEvalSnaps(const JobConfig& config, std::vector<data::Snap>* snaps);

// Runs `model` on `snaps` (in batches of `batch`) and decodes at most top_k
// boxes per snap with score >= threshold.
std::vector<std::vector<models::DetectorBox>> Detect(models::CenterNetImpl& model, const std::vector<data::Snap>& snaps,
                                                     int top_k, float threshold, int batch = 64);

// AP50 / COCO AP of `model` on `snaps`.
DetectionMetrics EvaluateDetector(models::CenterNetImpl& model, const std::vector<std::string>& categories,
                                  const std::vector<data::Snap>& snaps, int top_k);

// A picture (PNG) of the first `count` snaps, 4 per row: each snap's true
// boxes in green, the detections of `model` with score >= min_score in red.
Status WriteDetectionPicture(models::CenterNetImpl& model, const std::vector<data::Snap>& snaps, int count,
                             float min_score, const std::string& path);

// eval.json text for a detector.
std::string DetectorEvalJson(const JobConfig& config, const DetectionMetrics& metrics,
                             const DetectorTrainResult* training);

// Loads a detector from a model file (model.pt of a detector run, or a run
// directory holding one). *config receives the ModelConfig it carries.
// InvalidArgument when the file holds an embedder, NotFound when missing.
Status LoadDetector(const std::string& path, models::CenterNet* out, ModelConfig* config);

}  // namespace dtrain::worker
