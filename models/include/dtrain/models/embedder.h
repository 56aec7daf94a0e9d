// Embedder: a small ResNet that maps [B, C, H, W] images (Fashion-MNIST:
// [B, 1, 28, 28]) to L2-normalised [B, embedding_dim] embeddings.
//
// Layout (every entry of layers() in order):
//   0            Stem:        conv3x3(in_channels -> widths[0]) + BN + ReLU
//   1 .. S*K     BasicBlock:  K = blocks_per_stage blocks for each of the
//                             S = widths.size() stages; the first block of
//                             every stage after the first has stride 2
//                             (28 -> 14 -> 7 -> 4 ...)
//   S*K + 1      EmbeddingHead: global average pool, dropout (if > 0),
//                             Linear(widths.back() -> embedding_dim),
//                             BatchNorm1d(embedding_dim), L2 normalisation
//
// So layers()->size() == 1 + S*K + 1, and forward(x) == layers()->forward(x).
// Every layer takes and returns one tensor, which is what pipeline
// parallelism needs: any contiguous range of layers() is a stage, and
// SliceLayers() builds one that shares the parameters of this model.
//
// Batch size: the head's BatchNorm1d needs at least 2 samples per forward in
// training mode (per micro-batch under pipeline parallelism); eval mode works
// with any batch size.
//
// Initialisation: convolutions Kaiming-normal (fan_out, ReLU gain), BatchNorm
// weight 1 and bias 0, Linear LibTorch's default. Draws from torch's global
// generator, so torch::manual_seed(s) before construction makes it repeatable.
//
// Thread-safety: a module may not be used from two threads at once.
// Contains no distributed code; strategies wrap it (docs/architecture.md).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "dtrain/common/status.h"

namespace dtrain::models {

struct EmbedderOptions {
  // Channels of each stage; each stage after the first halves the resolution.
  // Default: {32, 64, 128}.
  std::vector<int64_t> widths{32, 64, 128};
  // Residual blocks per stage. Default: 1.
  int64_t blocks_per_stage = 1;
  // Size of the output embedding. Default: 128.
  int64_t embedding_dim = 128;
  // Dropout probability before the Linear layer of the head (0 = none).
  // Default: 0.
  double dropout = 0;
  // Channels of the input images. Default: 1 (grey-scale).
  int64_t in_channels = 1;

  // InvalidArgument unless widths is non-empty and every value, blocks_per_stage,
  // embedding_dim and in_channels are >= 1, and 0 <= dropout < 1. Messages
  // name the field as in ModelConfig ("model.widths[1]: ...").
  Status Validate() const;
};

// conv3x3 + BN + ReLU, stride 1.
class StemImpl : public torch::nn::Module {
 public:
  StemImpl(int64_t in_channels, int64_t out_channels);
  torch::Tensor forward(torch::Tensor x);

 private:
  torch::nn::Conv2d conv_{nullptr};
  torch::nn::BatchNorm2d bn_{nullptr};
};
TORCH_MODULE(Stem);

// Basic residual block (He et al. 2016): relu(bn2(conv2(relu(bn1(conv1(x))))) + s(x)),
// where s is the identity, or a 1x1 conv + BN projection when the stride or
// the channel count changes.
class BasicBlockImpl : public torch::nn::Module {
 public:
  BasicBlockImpl(int64_t in_channels, int64_t out_channels, int64_t stride);
  torch::Tensor forward(torch::Tensor x);

  // True when the shortcut is a projection (not the identity).
  bool has_projection() const { return !proj_conv_.is_empty(); }

 private:
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr};
  torch::nn::Conv2d conv2_{nullptr};
  torch::nn::BatchNorm2d bn2_{nullptr};
  torch::nn::Conv2d proj_conv_{nullptr};  // empty for the identity shortcut
  torch::nn::BatchNorm2d proj_bn_{nullptr};
};
TORCH_MODULE(BasicBlock);

// [B, C, H, W] -> [B, embedding_dim], rows of unit L2 norm.
class EmbeddingHeadImpl : public torch::nn::Module {
 public:
  EmbeddingHeadImpl(int64_t in_channels, int64_t embedding_dim, double dropout);
  torch::Tensor forward(torch::Tensor x);

 private:
  torch::nn::Dropout dropout_{nullptr};  // empty when dropout == 0
  torch::nn::Linear fc_{nullptr};
  torch::nn::BatchNorm1d bn_{nullptr};
};
TORCH_MODULE(EmbeddingHead);

class EmbedderImpl : public torch::nn::Module {
 public:
  // Precondition: options.Validate().ok(); otherwise throws c10::Error
  // (BuildEmbedder() in registry.h validates and returns a Status instead).
  explicit EmbedderImpl(const EmbedderOptions& options = {});

  // x: [B, in_channels, H, W] float. Returns [B, embedding_dim], unit rows.
  torch::Tensor forward(torch::Tensor x);

  // The ordered layers described at the top of this file. Registered as the
  // child "layers", so parameter names are "layers.<i>.<...>".
  torch::nn::Sequential& layers() { return layers_; }

  // A new Sequential holding layers [begin, end) of this model. The modules
  // (and so the parameters and BN buffers) are shared, not copied.
  // Precondition: 0 <= begin < end <= layers()->size().
  torch::nn::Sequential SliceLayers(int64_t begin, int64_t end) const;

  int64_t embedding_dim() const { return options_.embedding_dim; }
  const EmbedderOptions& options() const { return options_; }

 private:
  EmbedderOptions options_;
  torch::nn::Sequential layers_{nullptr};
};
TORCH_MODULE(Embedder);

}  // namespace dtrain::models
