// LossModule: the interface every embedding loss implements (ArcFace and
// CosFace in margin_heads.h, triplet in triplet.h). Build one by name with
// BuildLoss() in registry.h.
//
// A loss is a torch::nn::Module because some own parameters: the margin
// heads hold a [num_classes, embedding_dim] class-weight matrix that must be
// trained (and, under data parallelism, synchronised) together with the
// model. Use parameters() on the loss; it is empty for losses without any.
//
// Thread-safety: a loss may not be used from two threads at once.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>

namespace dtrain::models {

struct LossOutput {
  // Scalar loss, connected to the autograd graph of the embeddings (and of
  // the loss's own parameters). Never NaN for finite inputs: a batch without
  // a single valid triplet gives a zero that still back-propagates (zeros).
  torch::Tensor loss;
  // Triplet losses: the mined triplets (or anchor-positive pairs) whose loss
  // is > 0. Margin heads: the number of samples.
  int64_t active = 0;
  // active / number of valid candidates (triplets, anchors or pairs the miner
  // considered); 1 for margin heads; 0 when there were none.
  double active_fraction = 0;
};

class LossModuleImpl : public torch::nn::Module {
 public:
  // embeddings: [B, D] floating point, rows L2-normalised (Embedder output).
  // labels: [B] int64 class ids, on the same device.
  // Throws c10::Error on malformed input (wrong shapes or dtypes, labels out
  // of range): a programmer error, the trainer checks its data once.
  // Synchronises with the device once (to read `active`).
  virtual LossOutput Compute(const torch::Tensor& embeddings, const torch::Tensor& labels) = 0;

  // The registry name: "arcface", "cosface" or "triplet".
  virtual std::string name() const = 0;
};

}  // namespace dtrain::models
