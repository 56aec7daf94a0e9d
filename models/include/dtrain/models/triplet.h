// Triplet loss with online mining inside a batch (Schroff et al. 2015,
// "FaceNet"; Hermans et al. 2017, "In Defense of the Triplet Loss").
//
// For an anchor a, a positive p (same label, p != a) and a negative n
// (different label) the loss is relu(d(a, p) - d(a, n) + margin). The miner
// decides which triplets count:
//
//   BATCH_ALL   every valid (a, p, n); the loss is the mean over the triplets
//               whose loss is > 0 (zero-loss triplets would only dilute it).
//               active = that count, out of all valid triplets.
//   BATCH_HARD  per anchor the hardest positive (max d(a, p)) and the hardest
//               negative (min d(a, n)); the loss is the mean over anchors that
//               have both a positive and a negative. active = anchors with
//               loss > 0, out of those anchors.
//   SEMI_HARD   per (a, p) pair the negative with the smallest d(a, n) that is
//               strictly greater than d(a, p). When no negative is farther
//               than the positive, the farthest negative (max d(a, n)) is used
//               instead: the FaceNet / TensorFlow-Addons convention. The loss
//               is the mean over pairs whose anchor has a negative. active =
//               pairs with loss > 0, out of those pairs.
//
// Anchors without a positive or without a negative in the batch are skipped.
// A batch with no valid triplet (one class only, or all labels distinct)
// gives loss 0 connected to the graph (its gradient is zero, never NaN) and
// active 0.
//
// Distances, on the embeddings as given (the Embedder's are unit rows):
//   L2      Euclidean, sqrt(max(|a|^2 + |b|^2 - 2<a, b>, 1e-12)); the clamp
//           keeps the gradient finite on the diagonal and for duplicates.
//   COSINE  1 - <a/|a|, b/|b|>, in [0, 2].
//
// Cost: distances and BATCH_HARD / SEMI_HARD mining are O(B^2) memory
// (SEMI_HARD sorts each row, O(B^2 log B) time). BATCH_ALL evaluates all B^3
// triplets in chunks of anchors of at most 2^22 triplets each (B = 512 ->
// 16 anchors per chunk, a few 16 MiB float32 temporaries per chunk).
//
// TripletConfig.mining_scope is not handled here: for GLOBAL mining the
// trainer all-gathers embeddings and labels and passes the global batch.
#pragma once

#include <torch/torch.h>

#include <string>

#include "dtrain/common/status.h"
#include "dtrain/models/loss.h"

namespace dtrain::models {

enum class TripletDistance { kL2, kCosine };
enum class TripletMiner { kBatchAll, kBatchHard, kSemiHard };

struct TripletOptions {
  // Default: 0.2 (in distance units: L2 on unit vectors ranges over [0, 2]).
  double margin = 0.2;
  // Default: L2.
  TripletDistance distance = TripletDistance::kL2;
  // Default: SEMI_HARD.
  TripletMiner miner = TripletMiner::kSemiHard;

  // InvalidArgument unless margin is finite and >= 0 ("loss.triplet.margin: ...").
  Status Validate() const;
};

// [B, D] -> [B, B] distances, differentiable.
torch::Tensor PairwiseDistance(const torch::Tensor& embeddings, TripletDistance distance);

// Result of MineBatchHard for a batch of B: all [B].
struct BatchHardMining {
  torch::Tensor positive;  // int64: index of the hardest positive of each anchor
  torch::Tensor negative;  // int64: index of the hardest negative of each anchor
  torch::Tensor valid;     // bool: the anchor has a positive and a negative
                           // (positive/negative are meaningless where false)
};

// dist: [B, B] (not differentiated through), labels: [B] int64.
BatchHardMining MineBatchHard(const torch::Tensor& dist, const torch::Tensor& labels);

// Result of MineSemiHard: one entry per (anchor, positive) pair whose anchor
// has at least one negative, in row-major (anchor, positive) order; all [P].
struct SemiHardMining {
  torch::Tensor anchor;    // int64
  torch::Tensor positive;  // int64
  torch::Tensor negative;  // int64: the chosen negative
  torch::Tensor fallback;  // bool: no negative was farther than the positive,
                           // so `negative` is the farthest negative
};

// dist: [B, B] (not differentiated through), labels: [B] int64.
SemiHardMining MineSemiHard(const torch::Tensor& dist, const torch::Tensor& labels);

class TripletLossImpl : public LossModuleImpl {
 public:
  // Precondition: options.Validate().ok(); otherwise throws c10::Error.
  explicit TripletLossImpl(const TripletOptions& options = {});

  LossOutput Compute(const torch::Tensor& embeddings, const torch::Tensor& labels) override;

  std::string name() const override { return "triplet"; }
  const TripletOptions& options() const { return options_; }

 private:
  LossOutput BatchAll(const torch::Tensor& dist, const torch::Tensor& labels) const;
  LossOutput BatchHard(const torch::Tensor& dist, const torch::Tensor& labels) const;
  LossOutput SemiHard(const torch::Tensor& dist, const torch::Tensor& labels) const;

  TripletOptions options_;
};
TORCH_MODULE(TripletLoss);

}  // namespace dtrain::models
