// Internal to indexer/: the embedder an index is built or queried with.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/data/fashion_mnist.h"
#include "dtrain/indexer.pb.h"
#include "dtrain/job.pb.h"
#include "dtrain/models/embedder.h"

namespace dtrain::indexer::internal {

// The image size dtrain's embedders are trained at (Fashion-MNIST's).
inline constexpr int kModelImageRows = 28;
inline constexpr int kModelImageCols = 28;

struct LoadedModel {
  models::Embedder model{nullptr};  // in eval mode
  ModelConfig config;
  // "runs/quickstart/model.pt", "runs/x/store checkpoint 1200".
  std::string description;
  std::string job_name;
};

// `source` is a run directory (its model.pt; with from_checkpoint, or when it
// has no model.pt, the newest good checkpoint of its store) or a model file
// written by dtrain. Errors name the path and say what is missing.
Status LoadModelSource(const std::string& source, bool from_checkpoint, LoadedModel* out);

// Embeds every image of `images` ([N x D] floats, unit rows, row-major) in
// batches of `batch_size`, without gradients, with the model in eval mode. A
// progress bar (label `label`) when `progress`. Safe to call from several
// threads on one model (eval-mode forward only reads it).
Status EmbedImages(models::EmbedderImpl& model, const data::Dataset& images, int64_t batch_size, bool progress,
                   const std::string& label, std::vector<float>* out);

// Sets torch's intra-op threads: `threads` > 0, else every core.
void UseThreads(int threads);

// Saves `model` as DIR/model.pt and starts the manifest of the index
// directory DIR: format version, model source, digest and config, embedding
// dimension, the index parameters in effect (without the output directory
// and builder address). The caller adds the gallery, count and the rest.
Status WriteIndexModel(const std::string& dir, LoadedModel& model, int embedding_dim,
                       const IndexConfig& effective, IndexManifest* manifest);

// crc32c of a file's bytes, as 8 hex digits.
Status FileDigest(const std::string& path, std::string* digest);

}  // namespace dtrain::indexer::internal
