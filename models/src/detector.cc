#include "dtrain/models/detector.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "dtrain/job.pb.h"

namespace dtrain::models {
namespace {

namespace nn = torch::nn;

// Appends conv 3x3 - batch norm - ReLU to `seq`.
void AddConvBnRelu(nn::Sequential& seq, int in, int out, int stride, int dilation) {
  seq->push_back(
      nn::Conv2d(nn::Conv2dOptions(in, out, 3).stride(stride).padding(dilation).dilation(dilation).bias(false)));
  seq->push_back(nn::BatchNorm2d(out));
  seq->push_back(nn::ReLU(nn::ReLUOptions(true)));
}

// conv-bn-relu, conv-bn, plus a 1x1 projection when the width changes; ReLU
// after the sum. Stride 1, dilated.
class ResidualImpl : public nn::Module {
 public:
  ResidualImpl(int in, int out, int dilation) {
    nn::Sequential first;
    AddConvBnRelu(first, in, out, 1, dilation);
    a = register_module("a", first);
    b = register_module(
        "b", nn::Sequential(nn::Conv2d(nn::Conv2dOptions(out, out, 3).padding(dilation).dilation(dilation).bias(false)),
                            nn::BatchNorm2d(out)));
    if (in != out) {
      project = register_module(
          "project", nn::Sequential(nn::Conv2d(nn::Conv2dOptions(in, out, 1).bias(false)), nn::BatchNorm2d(out)));
    }
  }
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor skip = project ? project->forward(x) : x;
    return torch::relu(b->forward(a->forward(x)) + skip);
  }

 private:
  nn::Sequential a{nullptr}, b{nullptr}, project{nullptr};
};
TORCH_MODULE(Residual);

nn::Sequential Head(int in, int hidden, int out, double bias) {
  nn::Conv2d last(nn::Conv2dOptions(hidden, out, 1));
  torch::NoGradGuard no_grad;
  last->bias.fill_(bias);
  return nn::Sequential(nn::Conv2d(nn::Conv2dOptions(in, hidden, 3).padding(1)), nn::ReLU(nn::ReLUOptions(true)), last);
}

// Draws exp(-d^2 / 2 sigma^2) around (cx, cy) into `map` (rows x cols),
// keeping the larger value where peaks overlap.
void DrawGaussian(float* map, int rows, int cols, int cx, int cy, int radius) {
  const float sigma = static_cast<float>(2 * radius + 1) / 6.0f;
  for (int y = std::max(0, cy - radius); y <= std::min(rows - 1, cy + radius); ++y) {
    for (int x = std::max(0, cx - radius); x <= std::min(cols - 1, cx + radius); ++x) {
      const float d2 = static_cast<float>((x - cx) * (x - cx) + (y - cy) * (y - cy));
      const float v = std::exp(-d2 / (2 * sigma * sigma));
      float& cell = map[y * cols + x];
      cell = std::max(cell, v);
    }
  }
}

}  // namespace

CenterNetImpl::CenterNetImpl(const DetectorOptions& options) : options_(options) {
  const std::vector<int>& w = options_.widths;
  // The stem halves the resolution, widths[1] halves it again: stride 4.
  // Every later stage is a residual block at stride 4 with dilation 2^(i-1),
  // which widens the receptive field to the largest items (about 45 px).
  nn::Sequential body;
  AddConvBnRelu(body, 1, w[0], 2, 1);
  AddConvBnRelu(body, w[0], w[1], 2, 1);
  body->push_back(Residual(w[1], w[1], 1));
  int dilation = 2;
  for (size_t i = 2; i < w.size(); ++i, dilation *= 2) body->push_back(Residual(w[i - 1], w[i], dilation));
  backbone = register_module("backbone", body);
  const int features = w.back();
  // Heatmap logits start at the prior log(0.1 / 0.9) (CenterNet's -2.19), so
  // the focal loss does not start out dominated by the background.
  heatmap_head = register_module("heatmap", Head(features, options_.head_width, options_.num_categories, -2.19));
  size_head = register_module("size", Head(features, options_.head_width, 2, 0.0));
  offset_head = register_module("offset", Head(features, options_.head_width, 2, 0.0));
}

DetectorOutput CenterNetImpl::forward(const torch::Tensor& images) {
  torch::Tensor f = backbone->forward(images);
  return DetectorOutput{heatmap_head->forward(f), size_head->forward(f), offset_head->forward(f)};
}

bool IsDetectorModel(const std::string& model_name) { return model_name == "centernet_detector"; }

std::vector<std::string> DetectorCategories(const ModelConfig& config) {
  if (config.detector().categories_size() == 0) return {"tops", "bottoms", "bags", "footwear"};
  return {config.detector().categories().begin(), config.detector().categories().end()};
}

Status BuildDetector(const ModelConfig& config, CenterNet* out) {
  if (!IsDetectorModel(config.name())) {
    return Status::InvalidArgument("model.name: '" + config.name() + "' is not a detector (known: centernet_detector)");
  }
  const DetectorConfig& d = config.detector();
  DetectorOptions o;
  o.num_categories = static_cast<int>(DetectorCategories(config).size());
  if (d.widths_size() > 0) o.widths.assign(d.widths().begin(), d.widths().end());
  o.head_width = d.head_width();
  if (o.widths.size() < 2 || o.widths.size() > 6) {
    return Status::InvalidArgument("model.detector.widths: needs 2 to 6 widths, got " + std::to_string(o.widths.size()));
  }
  for (size_t i = 0; i < o.widths.size(); ++i) {
    if (o.widths[i] < 1 || o.widths[i] > 1024) {
      return Status::InvalidArgument("model.detector.widths[" + std::to_string(i) + "]: must be in [1, 1024], got " +
                                     std::to_string(o.widths[i]));
    }
  }
  if (o.head_width < 1 || o.head_width > 1024) {
    return Status::InvalidArgument("model.detector.head_width: must be in [1, 1024], got " + std::to_string(o.head_width));
  }
  if (o.num_categories < 1 || o.num_categories > 256) {
    return Status::InvalidArgument("model.detector.categories: needs 1 to 256 categories, got " +
                                   std::to_string(o.num_categories));
  }
  try {
    *out = CenterNet(o);
  } catch (const c10::Error& e) {
    return Status::Internal(std::string("building the detector: ") + e.what_without_backtrace());
  }
  return Status::OK();
}

torch::Tensor SnapPixelsToTensor(const uint8_t* pixels, int64_t n, int rows, int cols) {
  torch::Tensor bytes = torch::empty({n, 1, rows, cols}, torch::kUInt8);
  std::memcpy(bytes.data_ptr<uint8_t>(), pixels, static_cast<size_t>(n * rows * cols));
  return bytes.to(torch::kFloat32).div_(255.0f);
}

float GaussianRadius(float height, float width, float min_overlap) {
  // Three ways a predicted box can miss a true box of h x w by r: shifted by
  // r in x and y, shrunk by r on every side, grown by r on every side. Each
  // gives IoU = min_overlap as a quadratic in r; the smallest root bounds
  // all three.
  const float h = height, w = width, m = min_overlap;
  auto root = [](float a, float b, float c) {  // smaller root of a r^2 + b r + c = 0
    const float d = std::sqrt(std::max(0.0f, b * b - 4 * a * c));
    return (-b - d) / (2 * a);
  };
  // shifted: (w - r)(h - r) = 2m wh / (1 + m)
  const float shifted = root(1, -(w + h), w * h * (1 - 2 * m / (1 + m)));
  // shrunk: (w - 2r)(h - 2r) = m wh
  const float shrunk = root(4, -2 * (w + h), (1 - m) * w * h);
  // grown: wh = m (w + 2r)(h + 2r); the positive root
  const float a = 4 * m, b = 2 * m * (w + h), c = (m - 1) * w * h;
  const float grown = (-b + std::sqrt(std::max(0.0f, b * b - 4 * a * c))) / (2 * a);
  return std::max(0.0f, std::min({shifted, shrunk, grown}));
}

DetectorTargets BuildDetectorTargets(const std::vector<std::vector<DetectorBox>>& boxes, int num_categories,
                                     int out_rows, int out_cols, int max_boxes) {
  const int64_t batch = static_cast<int64_t>(boxes.size());
  DetectorTargets t;
  t.heatmap = torch::zeros({batch, num_categories, out_rows, out_cols});
  t.size = torch::zeros({batch, max_boxes, 2});
  t.offset = torch::zeros({batch, max_boxes, 2});
  t.index = torch::zeros({batch, max_boxes}, torch::kInt64);
  t.mask = torch::zeros({batch, max_boxes});
  float* heat = t.heatmap.data_ptr<float>();
  float* size = t.size.data_ptr<float>();
  float* offset = t.offset.data_ptr<float>();
  int64_t* index = t.index.data_ptr<int64_t>();
  float* mask = t.mask.data_ptr<float>();
  const float s = static_cast<float>(kDetectorStride);
  for (int64_t b = 0; b < batch; ++b) {
    int k = 0;
    for (const DetectorBox& box : boxes[b]) {
      if (k >= max_boxes) break;
      if (box.category < 0 || box.category >= num_categories) continue;
      const float w = (box.x1 - box.x0) / s, h = (box.y1 - box.y0) / s;
      if (w <= 0 || h <= 0) continue;
      const float cx = (box.x0 + box.x1) / 2 / s, cy = (box.y0 + box.y1) / 2 / s;
      const int ix = std::clamp(static_cast<int>(std::floor(cx)), 0, out_cols - 1);
      const int iy = std::clamp(static_cast<int>(std::floor(cy)), 0, out_rows - 1);
      const int radius = std::max(0, static_cast<int>(std::lround(GaussianRadius(h, w))));
      DrawGaussian(heat + (b * num_categories + box.category) * out_rows * out_cols, out_rows, out_cols, ix, iy, radius);
      const int64_t slot = b * max_boxes + k;
      size[slot * 2] = w;
      size[slot * 2 + 1] = h;
      offset[slot * 2] = cx - static_cast<float>(ix);
      offset[slot * 2 + 1] = cy - static_cast<float>(iy);
      index[slot] = static_cast<int64_t>(iy) * out_cols + ix;
      mask[slot] = 1;
      ++k;
    }
  }
  return t;
}

namespace {

// pred [B, 2, h, w] at each target's cell: [B, K, 2].
torch::Tensor GatherAt(const torch::Tensor& pred, const torch::Tensor& index) {
  const int64_t b = pred.size(0), c = pred.size(1);
  torch::Tensor flat = pred.reshape({b, c, -1}).permute({0, 2, 1});  // [B, hw, 2]
  return flat.gather(1, index.unsqueeze(2).expand({b, index.size(1), c}));
}

torch::Tensor MaskedL1(const torch::Tensor& pred, const torch::Tensor& target, const torch::Tensor& mask) {
  torch::Tensor m = mask.unsqueeze(2).expand_as(pred);
  return (torch::abs(pred - target) * m).sum() / (m.sum() + 1e-4);
}

}  // namespace

DetectorLoss ComputeDetectorLoss(const DetectorOutput& out, const DetectorTargets& targets, float size_weight,
                                 float offset_weight) {
  // Penalty-reduced pixel-wise focal loss (CenterNet, eq. 1) with alpha 2,
  // beta 4, in log-sigmoid form for stability.
  const torch::Tensor& x = out.heatmap;
  const torch::Tensor& gt = targets.heatmap;
  torch::Tensor p = torch::sigmoid(x).clamp(1e-4, 1 - 1e-4);
  torch::Tensor pos = gt.eq(1.0f).to(torch::kFloat32);
  torch::Tensor pos_loss = torch::log_sigmoid(x) * (1 - p).pow(2) * pos;
  torch::Tensor neg_loss = torch::log_sigmoid(-x) * p.pow(2) * (1 - gt).pow(4) * (1 - pos);
  torch::Tensor num_pos = pos.sum().clamp_min(1.0f);
  torch::Tensor heat = -(pos_loss.sum() + neg_loss.sum()) / num_pos;
  torch::Tensor size = MaskedL1(GatherAt(out.size, targets.index), targets.size, targets.mask);
  torch::Tensor offset = MaskedL1(GatherAt(out.offset, targets.index), targets.offset, targets.mask);
  DetectorLoss l;
  l.total = heat + size_weight * size + offset_weight * offset;
  l.heatmap = heat.item<double>();
  l.size = size.item<double>();
  l.offset = offset.item<double>();
  return l;
}

std::vector<std::vector<DetectorBox>> DecodeHeatmaps(const torch::Tensor& heat_in, const torch::Tensor& size_in,
                                                     const torch::Tensor& offset_in, int top_k, float threshold) {
  torch::NoGradGuard no_grad;
  const torch::Tensor heat = heat_in.to(torch::kFloat32).contiguous();
  const int64_t batch = heat.size(0), cats = heat.size(1), rows = heat.size(2), cols = heat.size(3);
  // A peak is a cell that is the maximum of its 3x3 neighbourhood.
  torch::Tensor hmax = torch::max_pool2d(heat, {3, 3}, {1, 1}, {1, 1});
  torch::Tensor peaks = heat * hmax.eq(heat).to(torch::kFloat32);
  const int64_t k = std::min<int64_t>(top_k, cats * rows * cols);
  auto [scores, indices] = peaks.reshape({batch, -1}).topk(k, 1);
  scores = scores.contiguous();
  indices = indices.contiguous();
  const torch::Tensor size = size_in.to(torch::kFloat32).contiguous();
  const torch::Tensor offset = offset_in.to(torch::kFloat32).contiguous();
  const float* sz = size.data_ptr<float>();
  const float* off = offset.data_ptr<float>();
  const float* sc = scores.data_ptr<float>();
  const int64_t* ix = indices.data_ptr<int64_t>();
  const float s = static_cast<float>(kDetectorStride);
  const float max_x = static_cast<float>(cols) * s, max_y = static_cast<float>(rows) * s;
  const int64_t plane = rows * cols;
  std::vector<std::vector<DetectorBox>> out(batch);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < k; ++i) {
      const float score = sc[b * k + i];
      if (score < threshold || score <= 0) break;  // sorted: the rest are lower
      const int64_t idx = ix[b * k + i];
      const int64_t cat = idx / plane, cell = idx % plane;
      const int64_t y = cell / cols, x = cell % cols;
      const float cx = (static_cast<float>(x) + off[(b * 2 + 0) * plane + cell]) * s;
      const float cy = (static_cast<float>(y) + off[(b * 2 + 1) * plane + cell]) * s;
      const float w = std::max(0.0f, sz[(b * 2 + 0) * plane + cell]) * s;
      const float h = std::max(0.0f, sz[(b * 2 + 1) * plane + cell]) * s;
      DetectorBox d;
      d.x0 = std::clamp(cx - w / 2, 0.0f, max_x);
      d.y0 = std::clamp(cy - h / 2, 0.0f, max_y);
      d.x1 = std::clamp(cx + w / 2, 0.0f, max_x);
      d.y1 = std::clamp(cy + h / 2, 0.0f, max_y);
      d.category = static_cast<int>(cat);
      d.score = score;
      out[b].push_back(d);
    }
  }
  return out;
}

std::vector<std::vector<DetectorBox>> DecodeDetections(const DetectorOutput& out, int top_k, float threshold) {
  torch::NoGradGuard no_grad;
  return DecodeHeatmaps(torch::sigmoid(out.heatmap), out.size, out.offset, top_k, threshold);
}

}  // namespace dtrain::models
