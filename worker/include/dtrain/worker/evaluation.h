// Retrieval evaluation of an embedder: embed a dataset, search exactly, score.
//
// The test set is queried against itself, leaving the query out (Musgrave et
// al.'s protocol; definitions in common/retrieval_metrics.h). The raw-pixel
// baseline is the same search on L2-normalised pixel vectors (cosine).
#pragma once

#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "dtrain/common/retrieval_metrics.h"
#include "dtrain/common/status.h"
#include "dtrain/data/fashion_mnist.h"
#include "dtrain/data/transforms.h"
#include "dtrain/models/embedder.h"

namespace dtrain::worker {

// [N, D] embeddings of every image of `dataset` (normalised as in training,
// no augmentation), computed in batches in eval mode without gradients. A
// model in training mode is switched to eval mode and back; one already in
// eval mode is left untouched, so several threads may embed with it at once
// (the indexer's queries do). `on_batch` (optional) gets the number of
// images embedded so far after each batch.
torch::Tensor EmbedDataset(models::EmbedderImpl& model, const data::Dataset& dataset, int64_t batch_size,
                           const data::NormalizeOptions& normalize = {},
                           const std::function<void(int64_t done)>& on_batch = {});

// [N, rows*cols] L2-normalised raw pixels: the baseline "embedding".
torch::Tensor RawPixelEmbeddings(const data::Dataset& dataset);

// Exact top-k by inner product (cosine for normalised rows) of `queries`
// against `reference`, best first. With `leave_one_out` the queries are the
// reference rows and each query's own row is excluded. Works in blocks of
// queries so memory stays at block x N.
Status ExactNeighbors(const torch::Tensor& queries, const torch::Tensor& reference, bool leave_one_out, int64_t k,
                      NeighborLists* out);

// Leave-one-out retrieval metrics of `embeddings` (rows L2-normalised).
Status EvaluateEmbeddings(const torch::Tensor& embeddings, const std::vector<int64_t>& labels,
                          const std::vector<int>& recall_ks, RetrievalMetrics* out);

// Labels of a dataset as int64.
std::vector<int64_t> Labels(const data::Dataset& dataset);

}  // namespace dtrain::worker
