// Registry: builds models and losses from the job config by name.
//
// This is the boundary between the config and LibTorch: it validates the
// config fields it reads, and any c10::Error LibTorch throws while building
// comes back as a Status (Internal), never as an exception.
//
// Everything is built on the CPU in float32, initialised from torch's global
// generator (call torch::manual_seed first for repeatable weights); move the
// result with ->to(device).
//
// Thread-safety: the functions share no state, but torch's global generator
// is one for the process: build on one thread when weights must be repeatable.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/models/embedder.h"
#include "dtrain/models/loss.h"

namespace dtrain {
class ModelConfig;  // dtrain/job.pb.h
class LossConfig;
}  // namespace dtrain

namespace dtrain::models {

// The model names BuildEmbedder accepts: {"resnet_embedder"}.
std::vector<std::string> ModelNames();
// The loss names BuildLoss accepts: {"arcface", "cosface", "triplet"}.
std::vector<std::string> LossNames();

// ModelConfig -> EmbedderOptions (empty widths -> {32, 64, 128}), validated.
// Does not look at config.name.
Status ToEmbedderOptions(const ModelConfig& config, EmbedderOptions* out);

// Builds config.name. InvalidArgument naming the field for an unknown name
// ("model.name: unknown model 'resnet9' (known: resnet_embedder)") or a bad
// value ("model.widths[0]: must be >= 1, got 0"). *out is set only on success.
Status BuildEmbedder(const ModelConfig& config, Embedder* out);

// Builds config.name with the matching sub-message (loss.arcface,
// loss.cosface or loss.triplet; proto defaults when unset). embedding_dim
// and num_classes size the margin heads' class weights; the triplet loss
// ignores them. InvalidArgument for an unknown name ("loss.name: unknown loss
// 'foo' (known: arcface, cosface, triplet)") or a bad value. *out is set only
// on success.
//
// The margin heads own trainable parameters (weight [num_classes,
// embedding_dim]): optimise (*out)->parameters() together with the model's.
Status BuildLoss(const LossConfig& config, int64_t embedding_dim, int64_t num_classes,
                 std::shared_ptr<LossModuleImpl>* out);

}  // namespace dtrain::models
