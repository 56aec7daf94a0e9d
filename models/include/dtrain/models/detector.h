// The snap detector: an anchor-free, CenterNet-style model (Zhou et al.,
// "Objects as Points", 2019) that finds fashion items in street snaps.
//
//   input    [B, 1, H, W] float, pixels / 255 (SnapPixelsToTensor)
//   backbone stem conv 3x3 stride 2, then one residual stage per width; the
//            second stage is at stride 2 again: features at output stride 4
//   heads    per output cell: a heatmap logit per category, the box size
//            (width, height in input pixels / stride, i.e. in cells) and the
//            sub-cell offset of the box centre (in cells, 0..1)
//
// Training targets (BuildDetectorTargets): each box puts a Gaussian peak at
// its centre cell on its category's heatmap (radius from the box size as in
// CenterNet, GaussianRadius below; the max where peaks overlap); its size and
// offset are regressed at that cell only. Loss: the penalty-reduced focal
// loss (alpha 2, beta 4) on the heatmaps, normalised by the number of boxes,
// plus size_weight x L1(size) + offset_weight x L1(offset).
//
// Decoding (DecodeDetections): sigmoid heatmaps, peaks = cells equal to the
// max of their 3x3 neighbourhood, the top-K peaks over all categories with
// score >= threshold, each turned into a box from its size and offset.
//
// Thread-safety: as any torch module; the free functions share no state.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "dtrain/common/status.h"

namespace dtrain {
class ModelConfig;  // dtrain/job.pb.h
}

namespace dtrain::models {

inline constexpr int kDetectorStride = 4;

struct DetectorOptions {
  int num_categories = 4;
  std::vector<int> widths = {32, 48, 64};
  int head_width = 64;
};

struct DetectorOutput {
  torch::Tensor heatmap;  // [B, C, H/4, W/4] logits
  torch::Tensor size;     // [B, 2, H/4, W/4] width, height in cells
  torch::Tensor offset;   // [B, 2, H/4, W/4] centre offset x, y in cells
};

class CenterNetImpl : public torch::nn::Module {
 public:
  explicit CenterNetImpl(const DetectorOptions& options);
  DetectorOutput forward(const torch::Tensor& images);
  const DetectorOptions& options() const { return options_; }

 private:
  DetectorOptions options_;
  torch::nn::Sequential backbone{nullptr};
  torch::nn::Sequential heatmap_head{nullptr}, size_head{nullptr}, offset_head{nullptr};
};
TORCH_MODULE(CenterNet);

// The detector names: {"centernet_detector"}.
bool IsDetectorModel(const std::string& model_name);

// The categories of config.detector (the four coarse Fashion-MNIST categories
// when empty).
std::vector<std::string> DetectorCategories(const ModelConfig& config);

// Builds config.name == "centernet_detector" from config.detector.
// InvalidArgument naming the field for a bad value or another model name.
Status BuildDetector(const ModelConfig& config, CenterNet* out);

// [n, 1, rows, cols] float tensor of `n` grayscale images (pixels / 255),
// image-major, each rows * cols bytes.
torch::Tensor SnapPixelsToTensor(const uint8_t* pixels, int64_t n, int rows, int cols);

// A box to learn or a detection found, in input pixels (x1, y1 exclusive).
struct DetectorBox {
  float x0 = 0, y0 = 0, x1 = 0, y1 = 0;
  int category = 0;
  float score = 1;  // detections only
};

struct DetectorTargets {
  torch::Tensor heatmap;  // [B, C, h, w] in [0, 1]
  torch::Tensor size;     // [B, K, 2] cells
  torch::Tensor offset;   // [B, K, 2] cells
  torch::Tensor index;    // [B, K] int64: y * w + x of each box's centre cell
  torch::Tensor mask;     // [B, K] float: 1 for a real box, 0 for padding
};

// Targets for a batch: boxes[b] are image b's boxes; out_rows x out_cols is
// the heatmap size (input / kDetectorStride). Boxes beyond `max_boxes` per
// image are dropped; boxes whose centre falls outside are clipped to the map.
DetectorTargets BuildDetectorTargets(const std::vector<std::vector<DetectorBox>>& boxes, int num_categories,
                                     int out_rows, int out_cols, int max_boxes = 32);

// The Gaussian radius (in cells) for a box of this size in cells, after
// CornerNet/CenterNet: the largest r such that a box shifted by r in x and y,
// or shrunk or grown by r on every side, still has IoU >= min_overlap with
// it. The heatmap target uses round(r) cells and sigma = (2 round(r) + 1) / 6.
float GaussianRadius(float height, float width, float min_overlap = 0.5f);

struct DetectorLoss {
  torch::Tensor total;  // differentiable
  double heatmap = 0, size = 0, offset = 0;
};

DetectorLoss ComputeDetectorLoss(const DetectorOutput& out, const DetectorTargets& targets, float size_weight,
                                 float offset_weight);

// Detections per image from the model's output (logits; sigmoid applied
// here), at most top_k per image with score >= threshold, boxes clipped to
// the input (out_rows * stride by out_cols * stride pixels).
std::vector<std::vector<DetectorBox>> DecodeDetections(const DetectorOutput& out, int top_k, float threshold);

// The same from heatmaps already in [0, 1] (for hand-made tests).
std::vector<std::vector<DetectorBox>> DecodeHeatmaps(const torch::Tensor& heat, const torch::Tensor& size,
                                                     const torch::Tensor& offset, int top_k, float threshold);

}  // namespace dtrain::models
