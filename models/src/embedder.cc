#include "dtrain/models/embedder.h"

#include <cmath>
#include <string>

namespace dtrain::models {
namespace {

namespace F = torch::nn::functional;

torch::nn::Conv2d Conv(int64_t in, int64_t out, int64_t kernel, int64_t stride) {
  // No bias: every convolution here is followed by BatchNorm.
  return torch::nn::Conv2d(
      torch::nn::Conv2dOptions(in, out, kernel).stride(stride).padding(kernel / 2).bias(false));
}

}  // namespace

Status EmbedderOptions::Validate() const {
  if (widths.empty()) return Status::InvalidArgument("model.widths: must have at least one stage");
  for (size_t i = 0; i < widths.size(); ++i) {
    if (widths[i] < 1) {
      return Status::InvalidArgument("model.widths[" + std::to_string(i) + "]: must be >= 1, got " +
                                     std::to_string(widths[i]));
    }
  }
  if (blocks_per_stage < 1) {
    return Status::InvalidArgument("model.blocks_per_stage: must be >= 1, got " + std::to_string(blocks_per_stage));
  }
  if (embedding_dim < 1) {
    return Status::InvalidArgument("model.embedding_dim: must be >= 1, got " + std::to_string(embedding_dim));
  }
  if (!(dropout >= 0 && dropout < 1)) {  // also rejects NaN
    return Status::InvalidArgument("model.dropout: must be in [0, 1), got " + std::to_string(dropout));
  }
  if (in_channels < 1) {
    return Status::InvalidArgument("in_channels: must be >= 1, got " + std::to_string(in_channels));
  }
  return Status::OK();
}

// ---- Stem ---------------------------------------------------------------------

StemImpl::StemImpl(int64_t in_channels, int64_t out_channels)
    : conv_(register_module("conv", Conv(in_channels, out_channels, 3, 1))),
      bn_(register_module("bn", torch::nn::BatchNorm2d(out_channels))) {}

torch::Tensor StemImpl::forward(torch::Tensor x) { return torch::relu(bn_(conv_(x))); }

// ---- BasicBlock ---------------------------------------------------------------

BasicBlockImpl::BasicBlockImpl(int64_t in_channels, int64_t out_channels, int64_t stride)
    : conv1_(register_module("conv1", Conv(in_channels, out_channels, 3, stride))),
      bn1_(register_module("bn1", torch::nn::BatchNorm2d(out_channels))),
      conv2_(register_module("conv2", Conv(out_channels, out_channels, 3, 1))),
      bn2_(register_module("bn2", torch::nn::BatchNorm2d(out_channels))) {
  if (stride != 1 || in_channels != out_channels) {
    proj_conv_ = register_module("proj_conv", Conv(in_channels, out_channels, 1, stride));
    proj_bn_ = register_module("proj_bn", torch::nn::BatchNorm2d(out_channels));
  }
}

torch::Tensor BasicBlockImpl::forward(torch::Tensor x) {
  torch::Tensor out = torch::relu(bn1_(conv1_(x)));
  out = bn2_(conv2_(out));
  const torch::Tensor shortcut = has_projection() ? proj_bn_(proj_conv_(x)) : x;
  return torch::relu(out + shortcut);
}

// ---- EmbeddingHead -------------------------------------------------------------

EmbeddingHeadImpl::EmbeddingHeadImpl(int64_t in_channels, int64_t embedding_dim, double dropout)
    : fc_(register_module("fc", torch::nn::Linear(in_channels, embedding_dim))),
      bn_(register_module("bn", torch::nn::BatchNorm1d(embedding_dim))) {
  if (dropout > 0) dropout_ = register_module("dropout", torch::nn::Dropout(dropout));
}

torch::Tensor EmbeddingHeadImpl::forward(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 4, "EmbeddingHead expects [B, C, H, W], got ", x.sizes());
  torch::Tensor h = x.mean({2, 3});  // global average pool -> [B, C]
  if (!dropout_.is_empty()) h = dropout_(h);
  h = bn_(fc_(h));
  return F::normalize(h, F::NormalizeFuncOptions().p(2).dim(1));
}

// ---- Embedder ------------------------------------------------------------------

EmbedderImpl::EmbedderImpl(const EmbedderOptions& options) : options_(options) {
  const Status st = options.Validate();
  TORCH_CHECK(st.ok(), "EmbedderOptions: ", st.message());

  torch::nn::Sequential layers;
  layers->push_back(Stem(options.in_channels, options.widths[0]));
  int64_t channels = options.widths[0];
  for (size_t stage = 0; stage < options.widths.size(); ++stage) {
    const int64_t width = options.widths[stage];
    for (int64_t b = 0; b < options.blocks_per_stage; ++b) {
      const int64_t stride = (stage > 0 && b == 0) ? 2 : 1;
      layers->push_back(BasicBlock(channels, width, stride));
      channels = width;
    }
  }
  layers->push_back(EmbeddingHead(channels, options.embedding_dim, options.dropout));
  layers_ = register_module("layers", layers);

  torch::NoGradGuard no_grad;
  for (auto& module : modules(/*include_self=*/false)) {
    if (auto* conv = module->as<torch::nn::Conv2d>()) {
      torch::nn::init::kaiming_normal_(conv->weight, /*a=*/0, torch::kFanOut, torch::kReLU);
    } else if (auto* bn2 = module->as<torch::nn::BatchNorm2d>()) {
      torch::nn::init::ones_(bn2->weight);
      torch::nn::init::zeros_(bn2->bias);
    } else if (auto* bn1 = module->as<torch::nn::BatchNorm1d>()) {
      torch::nn::init::ones_(bn1->weight);
      torch::nn::init::zeros_(bn1->bias);
    }
  }
}

torch::Tensor EmbedderImpl::forward(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) == options_.in_channels, "Embedder expects [B, ", options_.in_channels,
              ", H, W], got ", x.sizes());
  return layers_->forward(x);
}

torch::nn::Sequential EmbedderImpl::SliceLayers(int64_t begin, int64_t end) const {
  const int64_t n = static_cast<int64_t>(layers_->size());
  TORCH_CHECK(0 <= begin && begin < end && end <= n, "SliceLayers: need 0 <= begin < end <= ", n, ", got [", begin,
              ", ", end, ")");
  torch::nn::Sequential slice;
  for (int64_t i = begin; i < end; ++i) {
    slice->push_back(std::to_string(i), layers_->begin()[i]);
  }
  return slice;
}

}  // namespace dtrain::models
