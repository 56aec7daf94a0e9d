#include "dtrain/models/margin_heads.h"

#include <cmath>
#include <sstream>

namespace dtrain::models {
namespace {

namespace F = torch::nn::functional;

constexpr double kPi = 3.14159265358979323846;
// Keeps |cos| < 1 so that sqrt(1 - cos^2) has a finite gradient; float32
// represents 1 - 1e-7 as 0.99999988.
constexpr double kCosEps = 1e-7;

std::string Num(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

torch::Tensor Normalize(const torch::Tensor& t) { return F::normalize(t, F::NormalizeFuncOptions().p(2).dim(1)); }

}  // namespace

Status MarginSoftmaxOptions::Validate(const std::string& field) const {
  if (num_classes < 1) return Status::InvalidArgument("num_classes: must be >= 1, got " + std::to_string(num_classes));
  if (embedding_dim < 1) {
    return Status::InvalidArgument("embedding_dim: must be >= 1, got " + std::to_string(embedding_dim));
  }
  if (!(scale > 0) || !std::isfinite(scale)) {
    return Status::InvalidArgument(field + ".scale: must be > 0, got " + Num(scale));
  }
  if (kind == MarginKind::kArcFace) {
    if (!(margin >= 0 && margin < kPi / 2)) {
      return Status::InvalidArgument(field + ".margin: must be in [0, pi/2) radians, got " + Num(margin));
    }
  } else if (!(margin >= 0 && margin <= 1)) {
    return Status::InvalidArgument(field + ".margin: must be in [0, 1], got " + Num(margin));
  }
  return Status::OK();
}

MarginSoftmaxImpl::MarginSoftmaxImpl(const MarginSoftmaxOptions& options) : options_(options) {
  const Status st = options.Validate();
  TORCH_CHECK(st.ok(), "MarginSoftmaxOptions: ", st.message());
  weight_ = register_parameter("weight", torch::empty({options.num_classes, options.embedding_dim}));
  torch::NoGradGuard no_grad;
  torch::nn::init::xavier_uniform_(weight_);
}

std::string MarginSoftmaxImpl::name() const {
  return options_.kind == MarginKind::kArcFace ? "arcface" : "cosface";
}

torch::Tensor MarginSoftmaxImpl::Logits(const torch::Tensor& embeddings, const torch::Tensor& labels) {
  TORCH_CHECK(embeddings.dim() == 2 && embeddings.size(1) == options_.embedding_dim, name(),
              ": embeddings must be [B, ", options_.embedding_dim, "], got ", embeddings.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == embeddings.size(0) && labels.scalar_type() == torch::kLong,
              name(), ": labels must be int64 [", embeddings.size(0), "], got ", labels.scalar_type(), " ",
              labels.sizes());
  if (labels.numel() > 0) {
    const auto range = torch::aminmax(labels);
    const int64_t lo = std::get<0>(range).item<int64_t>();
    const int64_t hi = std::get<1>(range).item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < options_.num_classes, name(), ": labels must be in [0, ", options_.num_classes,
                "), got values in [", lo, ", ", hi, "]");
  }

  const torch::Tensor cos =
      torch::matmul(Normalize(embeddings), Normalize(weight_).t()).clamp(-1 + kCosEps, 1 - kCosEps);
  const torch::Tensor index = labels.unsqueeze(1);
  const torch::Tensor cos_t = cos.gather(1, index);  // [B, 1], target column

  const double m = options_.margin;
  torch::Tensor target;
  if (options_.kind == MarginKind::kCosFace) {
    target = cos_t - m;
  } else {
    const torch::Tensor sin_t = torch::sqrt(1 - cos_t * cos_t);
    const torch::Tensor shifted = cos_t * std::cos(m) - sin_t * std::sin(m);  // cos(theta + m)
    if (options_.easy_margin) {
      target = torch::where(cos_t > 0, shifted, cos_t);
    } else {
      const double th = std::cos(kPi - m);  // theta + m > pi  <=>  cos(theta) < th
      const double mm = std::sin(kPi - m) * m;
      target = torch::where(cos_t > th, shifted, cos_t - mm);
    }
  }
  return cos.scatter(1, index, target) * options_.scale;
}

LossOutput MarginSoftmaxImpl::Compute(const torch::Tensor& embeddings, const torch::Tensor& labels) {
  LossOutput out;
  const torch::Tensor logits = Logits(embeddings, labels);
  out.active = embeddings.size(0);
  if (out.active == 0) {  // cross_entropy's mean over nothing is NaN
    out.loss = logits.sum() * 0;
    return out;
  }
  out.loss = F::cross_entropy(logits, labels);
  out.active_fraction = out.active > 0 ? 1.0 : 0.0;
  return out;
}

}  // namespace dtrain::models
