#include "dtrain/models/triplet.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <sstream>

namespace dtrain::models {
namespace {

namespace F = torch::nn::functional;
using torch::indexing::Slice;

// BATCH_ALL evaluates at most this many (a, p, n) triplets at once.
constexpr int64_t kMaxTripletsPerChunk = int64_t{1} << 22;
// Smallest squared L2 distance passed to sqrt: d/dx sqrt(x) = 1/(2 sqrt(x))
// is then at most 5e5 instead of infinite at x = 0.
constexpr double kMinSquaredDistance = 1e-12;

struct PairMasks {
  torch::Tensor positive;  // [B, B] bool: same label, different index
  torch::Tensor negative;  // [B, B] bool: different label
};

PairMasks MakeMasks(const torch::Tensor& labels) {
  const torch::Tensor same = labels.unsqueeze(1) == labels.unsqueeze(0);
  const torch::Tensor eye = torch::eye(labels.size(0), labels.options().dtype(torch::kBool));
  return {same & ~eye, ~same};
}

void CheckMiningInputs(const torch::Tensor& dist, const torch::Tensor& labels) {
  TORCH_CHECK(labels.dim() == 1 && labels.scalar_type() == torch::kLong, "triplet: labels must be int64 [B], got ",
              labels.scalar_type(), " ", labels.sizes());
  TORCH_CHECK(dist.dim() == 2 && dist.size(0) == labels.size(0) && dist.size(1) == labels.size(0),
              "triplet: distances must be [B, B] with B = ", labels.size(0), ", got ", dist.sizes());
}

// Reads `active` and `candidates` (0-d integer tensors) with one device sync.
void FillCounts(const torch::Tensor& active, const torch::Tensor& candidates, LossOutput* out) {
  const torch::Tensor both =
      torch::stack({active.to(torch::kLong), candidates.to(active.device(), torch::kLong)}).cpu();
  out->active = both[0].item<int64_t>();
  const int64_t n = both[1].item<int64_t>();
  out->active_fraction = n > 0 ? static_cast<double>(out->active) / static_cast<double>(n) : 0.0;
}

}  // namespace

Status TripletOptions::Validate() const {
  if (!(margin >= 0) || !std::isfinite(margin)) {
    std::ostringstream os;
    os << "loss.triplet.margin: must be >= 0, got " << margin;
    return Status::InvalidArgument(os.str());
  }
  return Status::OK();
}

torch::Tensor PairwiseDistance(const torch::Tensor& embeddings, TripletDistance distance) {
  TORCH_CHECK(embeddings.dim() == 2, "triplet: embeddings must be [B, D], got ", embeddings.sizes());
  if (distance == TripletDistance::kCosine) {
    const torch::Tensor n = F::normalize(embeddings, F::NormalizeFuncOptions().p(2).dim(1));
    return (1 - torch::matmul(n, n.t())).clamp(0, 2);
  }
  const torch::Tensor sq = (embeddings * embeddings).sum(1);
  const torch::Tensor d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * torch::matmul(embeddings, embeddings.t());
  return torch::sqrt(d2.clamp_min(kMinSquaredDistance));
}

BatchHardMining MineBatchHard(const torch::Tensor& dist, const torch::Tensor& labels) {
  CheckMiningInputs(dist, labels);
  torch::NoGradGuard no_grad;
  const torch::Tensor d = dist.detach();
  const PairMasks masks = MakeMasks(labels);
  const double inf = std::numeric_limits<double>::infinity();
  BatchHardMining out;
  out.positive = d.masked_fill(~masks.positive, -inf).argmax(1);
  out.negative = d.masked_fill(~masks.negative, inf).argmin(1);
  out.valid = masks.positive.any(1) & masks.negative.any(1);
  return out;
}

SemiHardMining MineSemiHard(const torch::Tensor& dist, const torch::Tensor& labels) {
  CheckMiningInputs(dist, labels);
  torch::NoGradGuard no_grad;
  const torch::Tensor d = dist.detach();
  const PairMasks masks = MakeMasks(labels);

  // Per anchor row, its negatives' distances in ascending order; the other
  // entries become +inf and sort to the end. sorted[a, k] = d[a, order[a, k]].
  // (stable is spelled as optional<bool>: a plain `true` would pick the
  // sort(dim, descending) overload.)
  const torch::Tensor neg_only = d.masked_fill(~masks.negative, std::numeric_limits<double>::infinity());
  const auto [sorted, order] = neg_only.sort(/*stable=*/std::optional<bool>(true), /*dim=*/1, /*descending=*/false);
  const torch::Tensor num_neg = masks.negative.sum(1);  // [B]

  // first[a, p]: position in sorted[a] of the first negative with d(a, n) > d(a, p).
  const torch::Tensor first = torch::searchsorted(sorted, d.contiguous(), /*out_int32=*/false, /*right=*/true);

  const torch::Tensor pairs = (masks.positive & (num_neg > 0).unsqueeze(1)).nonzero();  // [P, 2], row-major
  SemiHardMining out;
  out.anchor = pairs.select(1, 0);
  out.positive = pairs.select(1, 1);
  const torch::Tensor pos_in_sorted = first.index({out.anchor, out.positive});
  const torch::Tensor last = num_neg.index_select(0, out.anchor) - 1;  // the farthest negative
  out.fallback = pos_in_sorted > last;
  out.negative = order.index({out.anchor, torch::where(out.fallback, last, pos_in_sorted)});
  return out;
}

TripletLossImpl::TripletLossImpl(const TripletOptions& options) : options_(options) {
  const Status st = options.Validate();
  TORCH_CHECK(st.ok(), "TripletOptions: ", st.message());
}

LossOutput TripletLossImpl::Compute(const torch::Tensor& embeddings, const torch::Tensor& labels) {
  TORCH_CHECK(embeddings.dim() == 2, "triplet: embeddings must be [B, D], got ", embeddings.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == embeddings.size(0) && labels.scalar_type() == torch::kLong,
              "triplet: labels must be int64 [", embeddings.size(0), "], got ", labels.scalar_type(), " ",
              labels.sizes());
  const torch::Tensor dist = PairwiseDistance(embeddings, options_.distance);
  switch (options_.miner) {
    case TripletMiner::kBatchAll:
      return BatchAll(dist, labels);
    case TripletMiner::kBatchHard:
      return BatchHard(dist, labels);
    case TripletMiner::kSemiHard:
      return SemiHard(dist, labels);
  }
  TORCH_CHECK(false, "triplet: unknown miner ", static_cast<int>(options_.miner));
  return {};
}

LossOutput TripletLossImpl::BatchAll(const torch::Tensor& dist, const torch::Tensor& labels) const {
  const PairMasks masks = MakeMasks(labels);
  const int64_t b = labels.size(0);
  const int64_t chunk = std::max<int64_t>(1, kMaxTripletsPerChunk / std::max<int64_t>(1, b * b));

  torch::Tensor total = dist.sum() * 0;  // connected to the graph even if nothing is added
  torch::Tensor active = torch::zeros({}, labels.options());
  for (int64_t begin = 0; begin < b; begin += chunk) {
    const int64_t end = std::min(b, begin + chunk);
    const torch::Tensor rows = dist.index({Slice(begin, end)});  // [c, B]
    // valid[a, p, n]: p is a positive and n a negative of anchor a.
    const torch::Tensor valid = masks.positive.index({Slice(begin, end)}).unsqueeze(2) &
                                masks.negative.index({Slice(begin, end)}).unsqueeze(1);
    const torch::Tensor loss = torch::relu(rows.unsqueeze(2) - rows.unsqueeze(1) + options_.margin);
    const torch::Tensor counted = valid & (loss > 0);
    total = total + torch::where(counted, loss, torch::zeros({}, loss.options())).sum();
    active = active + counted.sum();
  }
  // Every valid triplet of anchor a: (#positives of a) x (#negatives of a).
  const torch::Tensor candidates = (masks.positive.sum(1) * masks.negative.sum(1)).sum();

  LossOutput out;
  out.loss = total / active.clamp_min(1).to(total.scalar_type());
  FillCounts(active, candidates, &out);
  return out;
}

LossOutput TripletLossImpl::BatchHard(const torch::Tensor& dist, const torch::Tensor& labels) const {
  const BatchHardMining mined = MineBatchHard(dist, labels);
  const torch::Tensor d_ap = dist.gather(1, mined.positive.unsqueeze(1)).squeeze(1);
  const torch::Tensor d_an = dist.gather(1, mined.negative.unsqueeze(1)).squeeze(1);
  const torch::Tensor loss = torch::where(mined.valid, torch::relu(d_ap - d_an + options_.margin),
                                          torch::zeros({}, dist.options()));
  const torch::Tensor candidates = mined.valid.sum();

  LossOutput out;
  out.loss = loss.sum() / candidates.clamp_min(1).to(loss.scalar_type());
  FillCounts((loss > 0).sum(), candidates, &out);
  return out;
}

LossOutput TripletLossImpl::SemiHard(const torch::Tensor& dist, const torch::Tensor& labels) const {
  const SemiHardMining mined = MineSemiHard(dist, labels);
  LossOutput out;
  if (mined.anchor.numel() == 0) {
    out.loss = dist.sum() * 0;
    return out;
  }
  const torch::Tensor d_ap = dist.index({mined.anchor, mined.positive});
  const torch::Tensor d_an = dist.index({mined.anchor, mined.negative});
  const torch::Tensor loss = torch::relu(d_ap - d_an + options_.margin);
  out.loss = loss.mean();
  FillCounts((loss > 0).sum(), torch::scalar_tensor(mined.anchor.numel(), torch::kLong), &out);
  return out;
}

}  // namespace dtrain::models
