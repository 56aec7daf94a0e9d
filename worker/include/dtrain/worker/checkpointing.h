// What a training checkpoint holds, and how the trainer's state maps to the
// checkpoint store's records (common/checkpoint_store.h).
//
// The layout is the same in every parallelism mode, so a checkpoint made in
// one mode (or at one world size) resumes in another:
//   tensors  "model/<parameter or buffer name>"        the embedder
//            "loss/<parameter name>"                    e.g. ArcFace class weights
//            "optim/<model|loss>/<name>/<slot>"        optimizer state per parameter
//                                                       (SGD: momentum_buffer; AdamW:
//                                                       exp_avg, exp_avg_sq, step)
//   sections "trainer"   a TrainerState (proto/dtrain/trainer_state.proto): step,
//                        sampler epoch and position, RNG state, optimizer kind
//            "strategy/<name>"  free-form, for a strategy's own state
//
// Capture copies every tensor (the training thread may go on at once);
// Restore checks every name, shape and dtype before it changes anything.
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>

#include "dtrain/common/checkpoint_store.h"
#include "dtrain/common/status.h"
#include "dtrain/data/sampler.h"
#include "dtrain/job.pb.h"
#include "dtrain/models/embedder.h"
#include "dtrain/models/loss.h"
#include "dtrain/trainer_state.pb.h"

namespace dtrain::worker {

// A CPU copy of `tensor` as a store record.
Status TensorToRecord(const std::string& name, const torch::Tensor& tensor, TensorRecord* out);
// A tensor holding a copy of the record's bytes.
Status RecordToTensor(const TensorRecord& record, torch::Tensor* out);

// Digest of the parts of a config that a checkpoint must agree with to be
// resumed: the model and loss architecture and the dataset. Learning rate,
// length, parallelism and world size may change between runs.
std::string ResumeDigest(const JobConfig& config);

struct TrainingObjects {
  // The embedder or the detector.
  torch::nn::Module* model = nullptr;
  // The loss module's parameters (margin heads); null when the loss has none
  // (the detector).
  torch::nn::Module* loss = nullptr;
  torch::optim::Optimizer* optimizer = nullptr;
  OptimizerConfig::Kind optimizer_kind = OptimizerConfig::SGD;
};

// The optimizer state of `param` by slot name (SGD: momentum_buffer; AdamW:
// exp_avg, exp_avg_sq, max_exp_avg_sq, step as an int64 scalar); empty before
// its first step. The tensors are the optimizer's own (not copies).
std::map<std::string, torch::Tensor> OptimizerSlots(torch::optim::Optimizer& optimizer, OptimizerConfig::Kind kind,
                                                    const torch::Tensor& param);
// Replaces `param`'s optimizer state by `slots` (names as above; an empty map
// clears it).
void SetOptimizerSlots(torch::optim::Optimizer& optimizer, OptimizerConfig::Kind kind, const torch::Tensor& param,
                       const std::map<std::string, torch::Tensor>& slots);

// Fills `out` with copies of everything, plus the manifest fields.
Status CaptureCheckpoint(const JobConfig& config, const char* mode, int world_size, const TrainingObjects& objects,
                         const TrainerState& state, CheckpointData* out);

// Loads `data` into the objects and returns the trainer state. Corruption or
// InvalidArgument naming the tensor when the checkpoint does not fit; then
// nothing has been changed.
Status RestoreCheckpoint(const CheckpointData& data, const TrainingObjects& objects, TrainerState* state);

// Resuming a job: opens the store of `store_options` read-only, loads its
// newest intact checkpoint (falling back past corrupt ones, with a warning
// each) into `objects` and `sampler` and returns its TrainerState in *state.
// Steps count global batches, whose size changes with the world size: at
// another data_world_size the step (and so the LR schedule) continues from
// the same point of the data (epoch and position). *resumed is false, and
// nothing changed, when the store does not exist or holds no checkpoint.
// Errors as RestoreCheckpoint's, or the store's.
Status ResumeFromStore(const StoreOptions& store_options, const TrainingObjects& objects, data::Sampler* sampler,
                       int data_world_size, int64_t steps_per_epoch, TrainerState* state, bool* resumed);

}  // namespace dtrain::worker
