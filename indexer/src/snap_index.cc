#include "dtrain/indexer/snap_index.h"

#include <google/protobuf/text_format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <cstring>
#include <set>
#include <unordered_map>
#include <sstream>

#include "dtrain/common/detection_metrics.h"
#include "dtrain/common/metrics_log.h"
#include "dtrain/common/progress.h"
#include "dtrain/data/fashion_mnist.h"
#include "dtrain/indexer/metadata_store.h"
#include "dtrain/indexer/searcher.h"
#include "dtrain/indexer/vector_index.h"
#include "dtrain/models/detector.h"
#include "dtrain/worker/detector_trainer.h"
#include "dtrain/worker/trainer.h"
#include "dtrain/data/draw.h"
#include "model_io.h"
#include "index_dir.h"

namespace dtrain::indexer {
namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace {

constexpr const char* kSnapIndexFile = "snap_index.json";
constexpr const char* kDetectorFile = "detector.pt";
constexpr int kSnapIndexFormat = 1;
// snap_index.json's pixel_descriptor.kind of item templates (an index
// written before them has 14x14 float descriptors without a kind: it opens
// with pixel weight 0).
constexpr const char* kTemplateKind = "item_template_masked_ncc";

double Since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string Join(const std::vector<std::string>& v) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + v[i];
  return out;
}

int FindName(const std::vector<std::string>& names, const std::string& name) {
  auto it = std::find(names.begin(), names.end(), name);
  return it == names.end() ? -1 : static_cast<int>(it - names.begin());
}

// categories/<i>_<name>, the name reduced to [A-Za-z0-9_-].
std::string CategoryDir(size_t i, const std::string& name) {
  std::string safe;
  for (char c : name) safe += std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' ? c : '_';
  return "categories/" + std::to_string(i) + "_" + safe;
}

std::string SnapName(const data::Snap& s) {
  return s.file_name.empty() ? "snap " + std::to_string(s.id) : s.file_name;
}

using internal::DirCleanup;
using internal::UniqueSibling;

// ---- resampling -----------------------------------------------------------------

// The source taps of one output axis: output pixel i covers source
// coordinates [start + i * step, start + (i + 1) * step); a triangle filter
// of radius max(step, 1) around its centre. Taps outside [0, in) read 0 but
// still count in the normalisation (the padding is black).
struct AxisTaps {
  std::vector<int> first;     // per output pixel
  std::vector<int> count;     // per output pixel
  std::vector<float> weight;  // per output pixel, `count` each, at offset i * max_taps
  int max_taps = 0;
};

AxisTaps ComputeTaps(double start, double extent, int out) {
  AxisTaps t;
  const double step = extent / out;
  const double radius = std::max(step, 1.0);
  t.max_taps = static_cast<int>(std::ceil(radius)) * 2 + 2;
  t.first.resize(static_cast<size_t>(out));
  t.count.resize(static_cast<size_t>(out));
  t.weight.assign(static_cast<size_t>(out) * static_cast<size_t>(t.max_taps), 0.f);
  for (int i = 0; i < out; ++i) {
    const double centre = start + (i + 0.5) * step;
    const int lo = static_cast<int>(std::floor(centre - radius));
    const int hi = static_cast<int>(std::ceil(centre + radius));
    double sum = 0;
    int n = 0;
    float* w = &t.weight[static_cast<size_t>(i) * static_cast<size_t>(t.max_taps)];
    for (int j = lo; j <= hi && n < t.max_taps; ++j) {
      const double x = std::abs((j + 0.5 - centre) / radius);
      const double v = x < 1 ? 1 - x : 0;
      w[n++] = static_cast<float>(v);
      sum += v;
    }
    if (sum > 0) {
      for (int j = 0; j < n; ++j) w[j] = static_cast<float>(w[j] / sum);
    }
    t.first[static_cast<size_t>(i)] = lo;
    t.count[static_cast<size_t>(i)] = n;
  }
  return t;
}

// The 28x28 model input of every product image.
data::GrayImage ProductInput(const data::GrayImage& product) {
  if (product.rows == internal::kModelImageRows && product.cols == internal::kModelImageCols) return product;
  data::SnapBox whole;
  whole.x1 = static_cast<float>(product.cols);
  whole.y1 = static_cast<float>(product.rows);
  return CropSquare(product.pixels.data(), product.rows, product.cols, whole, internal::kModelImageRows);
}

// A blank canvas of rows x cols (each rounded up to the detector's stride).
data::Snap Canvas(int rows, int cols) {
  data::Snap s;
  s.rows = (rows + models::kDetectorStride - 1) / models::kDetectorStride * models::kDetectorStride;
  s.cols = (cols + models::kDetectorStride - 1) / models::kDetectorStride * models::kDetectorStride;
  s.pixels.assign(static_cast<size_t>(s.rows) * static_cast<size_t>(s.cols), 0);
  return s;
}

// `snap` padded with 0 on the right and bottom to multiples of the
// detector's stride (the boxes found are clipped back to the snap).
data::Snap PadForDetector(const data::Snap& snap) {
  if (snap.rows % models::kDetectorStride == 0 && snap.cols % models::kDetectorStride == 0) return snap;
  data::Snap p = Canvas(snap.rows, snap.cols);
  p.id = snap.id;
  for (int r = 0; r < snap.rows; ++r) {
    std::copy_n(snap.pixels.data() + static_cast<size_t>(r) * snap.cols, snap.cols,
                p.pixels.data() + static_cast<size_t>(r) * p.cols);
  }
  return p;
}

// ---- building -------------------------------------------------------------------

// The crops of one category, waiting to be embedded and indexed.
struct CategoryItems {
  data::Dataset crops;
  std::vector<ItemMeta> metas;
  std::vector<int64_t> ids;
  internal::LoadedModel* model = nullptr;
  std::string model_source;
  std::vector<float> vectors;
  std::vector<uint8_t> templates;  // kItemTemplatePixels per item
  double embed_seconds = 0;
};

constexpr char kTemplateMagic[8] = {'D', 'T', 'T', 'M', 'P', 'L', '0', '1'};
constexpr int64_t kTemplateHeaderBytes = 8 + 4 + 4 + 8;

int64_t TemplateFileBytes(int64_t count) {
  return kTemplateHeaderBytes + count * static_cast<int64_t>(sizeof(int64_t) + kItemTemplatePixels);
}

// templates.u8 (the layout of snap_index.h), through WriteFileAtomically.
Status WriteTemplateFile(const std::string& path, const std::vector<int64_t>& ids,
                         const std::vector<uint8_t>& templates) {
  const int64_t count = static_cast<int64_t>(ids.size());
  if (templates.size() != ids.size() * kItemTemplatePixels) {
    return Status::Internal(path + ": " + std::to_string(templates.size()) + " template bytes for " +
                            std::to_string(count) + " items");
  }
  std::string bytes;
  bytes.reserve(static_cast<size_t>(TemplateFileBytes(count)));
  auto put = [&bytes](const void* p, size_t n) { bytes.append(static_cast<const char*>(p), n); };
  const int32_t side = kItemTemplateSide, reserved = 0;
  put(kTemplateMagic, sizeof kTemplateMagic);
  put(&side, sizeof side);
  put(&reserved, sizeof reserved);
  put(&count, sizeof count);
  put(ids.data(), ids.size() * sizeof(int64_t));
  put(templates.data(), templates.size());
  return WriteFileAtomically(path, bytes);
}

// The masked normalised cross-correlation of TemplateSimilarity, prepared
// once per product: the positions and values of its mask pixels.
class TemplateMatcher {
 public:
  explicit TemplateMatcher(const data::GrayImage& product_template) {
    const int side = kItemTemplateSide;
    if (product_template.rows != side || product_template.cols != side) return;
    for (int y = 0; y < side; ++y) {
      for (int x = 0; x < side; ++x) {
        const uint8_t v = product_template.pixels[static_cast<size_t>(y) * side + x];
        if (v > kItemMaskThreshold) {
          ys_.push_back(y);
          xs_.push_back(x);
          values_.push_back(v);
        }
      }
    }
  }

  // `item`: kItemTemplatePixels bytes.
  float Score(const uint8_t* item) const {
    constexpr int side = kItemTemplateSide;
    constexpr int kMinPixels = 16;
    if (static_cast<int>(values_.size()) < kMinPixels) return 0.f;
    double best = -1;
    bool any = false;
    for (int dy = -kTemplateMaxShift; dy <= kTemplateMaxShift; ++dy) {
      for (int dx = -kTemplateMaxShift; dx <= kTemplateMaxShift; ++dx) {
        double sq = 0, sg = 0, sqq = 0, sgg = 0, sqg = 0;
        int n = 0;
        for (size_t i = 0; i < values_.size(); ++i) {
          const int y = ys_[i] + dy, x = xs_[i] + dx;
          if (y < 0 || y >= side || x < 0 || x >= side) continue;
          const double a = values_[i], b = item[y * side + x];
          sq += a;
          sg += b;
          sqq += a * a;
          sgg += b * b;
          sqg += a * b;
          ++n;
        }
        if (n < kMinPixels) continue;
        const double vq = sqq - sq * sq / n, vg = sgg - sg * sg / n;
        const double r = vq > 1e-9 && vg > 1e-9 ? (sqg - sq * sg / n) / std::sqrt(vq * vg) : 0.0;
        best = any ? std::max(best, r) : r;
        any = true;
      }
    }
    return any ? static_cast<float>(std::clamp(best, -1.0, 1.0)) : 0.f;
  }

 private:
  std::vector<int> ys_, xs_;
  std::vector<float> values_;
};

void AddItem(const data::Snap& snap, int64_t ordinal, const data::SnapBox& box, int category, float score,
             int fine_class, int64_t source_index, bool normalize, IndexedSnap* indexed, CategoryItems* items) {
  const int64_t item_ordinal = static_cast<int64_t>(indexed->items.size());
  const int64_t id = ordinal * kMaxItemsPerSnap + item_ordinal;
  IndexedItem it;
  it.box = box;
  it.category = category;
  it.score = score;
  indexed->items.push_back(it);
  const data::GrayImage tmpl = CropSquare(snap.pixels.data(), snap.rows, snap.cols, box, kItemTemplateSide);
  items->templates.insert(items->templates.end(), tmpl.pixels.begin(), tmpl.pixels.end());
  data::GrayImage crop = CropSquare(snap.pixels.data(), snap.rows, snap.cols, box, internal::kModelImageRows);
  if (normalize) NormalizeCrop(&crop);
  items->crops.images.insert(items->crops.images.end(), crop.pixels.begin(), crop.pixels.end());
  items->crops.labels.push_back(static_cast<uint8_t>(std::max(fine_class, 0)));
  ++items->crops.size;
  ItemMeta m;
  m.set_id(id);
  m.set_label(fine_class);
  if (fine_class >= 0 && fine_class < 10) m.set_label_name(data::ClassNames()[static_cast<size_t>(fine_class)]);
  m.set_source(SnapName(snap));
  m.set_dataset_index(source_index);
  items->metas.push_back(std::move(m));
  items->ids.push_back(id);
}

// Writes one category's index directory in the layout of index_builder.h.
Status WriteCategoryIndex(const std::string& dir, const std::string& category, const std::string& snaps_description,
                          IndexConfig::Kind kind, const CategoryItems& items, IndexManifest* manifest) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Status::IOError("cannot create " + dir + ": " + ec.message());
  internal::LoadedModel& model = *items.model;
  const int dim = static_cast<int>(model.model->embedding_dim());
  IndexConfig params;
  params.set_kind(kind);
  params.set_gallery(snaps_description);
  const auto t0 = std::chrono::steady_clock::now();
  std::unique_ptr<VectorIndex> index;
  IndexConfig effective;
  DTRAIN_RETURN_IF_ERROR(VectorIndex::Build(params, dim, items.vectors.data(), items.ids.data(), items.crops.size,
                                            &index, &effective)
                             .WithContext("category " + category));
  const double build_s = Since(t0);
  IndexManifest m;
  DTRAIN_RETURN_IF_ERROR(internal::WriteIndexModel(dir, model, dim, effective, &m));
  m.set_gallery_description(snaps_description + ": " + std::to_string(items.crops.size) + " " + category +
                            " items, 28x28 crops");
  m.set_count(items.crops.size);
  int64_t labelled = 0;
  for (const ItemMeta& it : items.metas) labelled += it.label() >= 0 ? 1 : 0;
  m.set_labelled(labelled);
  for (const char* n : data::ClassNames()) m.add_label_names(n);
  m.set_image_rows(internal::kModelImageRows);
  m.set_image_cols(internal::kModelImageCols);
  m.set_created_unix(static_cast<int64_t>(std::time(nullptr)));
  m.set_embed_seconds(items.embed_seconds);
  m.set_build_seconds(build_s);
  m.set_embed_images_per_sec(items.crops.size / std::max(items.embed_seconds, 1e-9));
  m.set_job_name(model.job_name);
  DTRAIN_RETURN_IF_ERROR(index->Save(dir + "/index.faiss"));
  DTRAIN_RETURN_IF_ERROR(WriteTemplateFile(dir + "/" + kItemTemplateFile, items.ids, items.templates));
  {
    std::unique_ptr<MetadataStore> meta;
    DTRAIN_RETURN_IF_ERROR(MetadataStore::Create(dir + "/meta", &meta));
    DTRAIN_RETURN_IF_ERROR(meta->PutAll(items.metas));
  }
  std::string text;
  google::protobuf::TextFormat::PrintToString(m, &text);
  DTRAIN_RETURN_IF_ERROR(WriteFileAtomically(
      dir + "/manifest.textproto", "# dtrain index manifest (proto/dtrain/indexer.proto IndexManifest)\n" + text));
  *manifest = m;
  return Status::OK();
}

Status CheckSnapImages(const std::vector<data::Snap>& snaps, const std::string& where) {
  const data::Snap& first = snaps.front();
  for (const data::Snap& s : snaps) {
    if (s.rows < 1 || s.cols < 1 || s.pixels.size() != static_cast<size_t>(s.rows) * static_cast<size_t>(s.cols)) {
      return Status::InvalidArgument(where + ": " + SnapName(s) + " has " + std::to_string(s.pixels.size()) +
                                     " pixels for a " + std::to_string(s.cols) + "x" + std::to_string(s.rows) +
                                     " image (8-bit grayscale, one byte per pixel)");
    }
    if (s.rows != first.rows || s.cols != first.cols) {
      return Status::InvalidArgument(where + ": " + SnapName(s) + " is " + std::to_string(s.cols) + "x" +
                                     std::to_string(s.rows) + " but " + SnapName(first) + " is " +
                                     std::to_string(first.cols) + "x" + std::to_string(first.rows) +
                                     "; every snap of an index has one size");
    }
  }
  return Status::OK();
}

}  // namespace

bool ParseSnapBoxes(const std::string& name, SnapBoxes* boxes) {
  const std::string n = Lower(name);
  if (n == "detected") {
    *boxes = SnapBoxes::kDetected;
  } else if (n == "truth" || n == "ground_truth") {
    *boxes = SnapBoxes::kGroundTruth;
  } else if (n == "whole" || n == "whole_snap") {
    *boxes = SnapBoxes::kWholeSnap;
  } else {
    return false;
  }
  return true;
}

const char* SnapBoxesName(SnapBoxes boxes) {
  switch (boxes) {
    case SnapBoxes::kDetected:
      return "detected";
    case SnapBoxes::kGroundTruth:
      return "truth";
    case SnapBoxes::kWholeSnap:
      return "whole";
  }
  return "?";
}

bool IsSnapIndexDir(const std::string& dir) {
  std::error_code ec;
  return fs::is_regular_file(fs::path(dir) / kSnapIndexFile, ec);
}

data::GrayImage CropSquare(const uint8_t* pixels, int rows, int cols, const data::SnapBox& box, int size) {
  data::GrayImage out;
  out.rows = out.cols = size;
  out.pixels.assign(static_cast<size_t>(size) * static_cast<size_t>(size), 0);
  const double side = std::max<double>({box.width(), box.height(), 1e-3});
  const double cx = 0.5 * (box.x0 + box.x1), cy = 0.5 * (box.y0 + box.y1);
  const AxisTaps tx = ComputeTaps(cx - side / 2, side, size);
  const AxisTaps ty = ComputeTaps(cy - side / 2, side, size);
  // Rows first: every source row the output needs, resampled along x.
  const int row_lo = std::max(0, ty.first.front());
  const int row_hi = std::min(rows, ty.first.back() + ty.count.back());
  std::vector<float> horiz(static_cast<size_t>(std::max(0, row_hi - row_lo)) * static_cast<size_t>(size), 0.f);
  for (int r = row_lo; r < row_hi; ++r) {
    const uint8_t* src = pixels + static_cast<size_t>(r) * static_cast<size_t>(cols);
    float* dst = &horiz[static_cast<size_t>(r - row_lo) * static_cast<size_t>(size)];
    for (int x = 0; x < size; ++x) {
      const float* w = &tx.weight[static_cast<size_t>(x) * static_cast<size_t>(tx.max_taps)];
      float v = 0;
      for (int j = 0; j < tx.count[static_cast<size_t>(x)]; ++j) {
        const int c = tx.first[static_cast<size_t>(x)] + j;
        if (c >= 0 && c < cols) v += w[j] * src[c];
      }
      dst[x] = v;
    }
  }
  for (int y = 0; y < size; ++y) {
    const float* w = &ty.weight[static_cast<size_t>(y) * static_cast<size_t>(ty.max_taps)];
    for (int x = 0; x < size; ++x) {
      float v = 0;
      for (int j = 0; j < ty.count[static_cast<size_t>(y)]; ++j) {
        const int r = ty.first[static_cast<size_t>(y)] + j;
        if (r >= row_lo && r < row_hi) v += w[j] * horiz[static_cast<size_t>(r - row_lo) * size + x];
      }
      out.pixels[static_cast<size_t>(y) * size + x] = static_cast<uint8_t>(std::clamp(std::lround(v), 0L, 255L));
    }
  }
  return out;
}

void NormalizeCrop(data::GrayImage* image) {
  const int rows = image->rows, cols = image->cols;
  if (rows < 1 || cols < 1) return;
  std::vector<uint8_t>& px = image->pixels;
  std::vector<uint8_t> border;
  for (int x = 0; x < cols; ++x) {
    border.push_back(px[static_cast<size_t>(x)]);
    if (rows > 1) border.push_back(px[static_cast<size_t>(rows - 1) * cols + x]);
  }
  for (int y = 1; y + 1 < rows; ++y) {
    border.push_back(px[static_cast<size_t>(y) * cols]);
    if (cols > 1) border.push_back(px[static_cast<size_t>(y) * cols + cols - 1]);
  }
  std::nth_element(border.begin(), border.begin() + static_cast<std::ptrdiff_t>(border.size() / 2), border.end());
  const int background = border[border.size() / 2];
  const int brightest = *std::max_element(px.begin(), px.end());
  const double gain = 255.0 / std::max(1, brightest - background);
  for (uint8_t& v : px) v = static_cast<uint8_t>(std::clamp(std::lround((v - background) * gain), 0L, 255L));
}

data::SnapBox ItemBounds(const data::GrayImage& image, int threshold) {
  int x0 = image.cols, y0 = image.rows, x1 = 0, y1 = 0;
  for (int y = 0; y < image.rows; ++y) {
    for (int x = 0; x < image.cols; ++x) {
      if (image.pixels[static_cast<size_t>(y) * image.cols + x] <= threshold) continue;
      x0 = std::min(x0, x);
      y0 = std::min(y0, y);
      x1 = std::max(x1, x + 1);
      y1 = std::max(y1, y + 1);
    }
  }
  data::SnapBox box;
  if (x1 <= x0) {
    box.x1 = static_cast<float>(image.cols);
    box.y1 = static_cast<float>(image.rows);
    return box;
  }
  box.x0 = static_cast<float>(x0);
  box.y0 = static_cast<float>(y0);
  box.x1 = static_cast<float>(x1);
  box.y1 = static_cast<float>(y1);
  return box;
}

data::GrayImage ProductTemplate(const data::GrayImage& product) {
  return CropSquare(product.pixels.data(), product.rows, product.cols, ItemBounds(product), kItemTemplateSide);
}

float TemplateSimilarity(const data::GrayImage& product_template, const data::GrayImage& item_template) {
  if (item_template.rows != kItemTemplateSide || item_template.cols != kItemTemplateSide ||
      item_template.pixels.size() != static_cast<size_t>(kItemTemplatePixels)) {
    return 0.f;
  }
  return TemplateMatcher(product_template).Score(item_template.pixels.data());
}

Status BuildSnapIndex(const SnapIndexOptions& o, SnapIndexSummary* summary) {
  if (o.output_dir.empty()) return Status::InvalidArgument("no output directory for the snap index");
  fs::path out_path = fs::path(o.output_dir).lexically_normal();
  if (out_path.filename().empty()) out_path = out_path.parent_path();  // "dir/"
  const std::string out = out_path.string();
  std::error_code ec;
  if (fs::exists(out, ec) && !IsSnapIndexDir(out) && !(fs::is_directory(out, ec) && fs::is_empty(out, ec))) {
    return Status::FailedPrecondition(out + " exists and is not a snap index; it will not be replaced");
  }
  const bool whole = o.boxes == SnapBoxes::kWholeSnap;
  if (whole && !o.detector.empty()) {
    return Status::InvalidArgument("whole-snap indexes use no detector; leave the detector out (or index "
                                   "detected or truth boxes)");
  }
  if (whole && !o.category_embedders.empty()) {
    return Status::InvalidArgument("whole-snap indexes have no categories: give one embedder, not one per category");
  }
  if (o.boxes == SnapBoxes::kDetected && o.detector.empty()) {
    return Status::InvalidArgument("indexing detected boxes needs a detector (a detector run directory or model file)");
  }
  if (o.max_detections < 0 || o.max_detections > kMaxItemsPerSnap) {
    return Status::InvalidArgument("max_detections must be in [0, " + std::to_string(kMaxItemsPerSnap) + "], got " +
                                   std::to_string(o.max_detections));
  }
  if (!(o.min_score >= 0 && o.min_score <= 1)) {
    return Status::InvalidArgument("min_score must be in [0, 1], got " + std::to_string(o.min_score));
  }
  if (o.detect_batch_size < 1 || o.embed_batch_size < 1) return Status::InvalidArgument("batch sizes must be >= 1");
  if (!(o.pixel_weight >= 0 && o.pixel_weight <= 1)) {
    return Status::InvalidArgument("pixel_weight must be in [0, 1], got " + std::to_string(o.pixel_weight));
  }

  // 1. The snaps.
  std::vector<data::Snap> loaded;
  const std::vector<data::Snap>* snaps = nullptr;
  std::vector<std::string> ann_categories;
  std::string where;
  std::string snap_dir;
  if (!o.snap_dir.empty()) {
    snap_dir = fs::absolute(o.snap_dir).lexically_normal().string();
    DTRAIN_RETURN_IF_ERROR(data::ReadSnapDirectory(o.snap_dir, true, &loaded, &ann_categories));
    snaps = &loaded;
    where = (fs::path(o.snap_dir) / "annotations.json").string();
  } else if (o.snaps != nullptr) {
    snaps = o.snaps;
    if (o.snap_categories.empty()) {
      for (const char* c : data::CoarseCategoryNames()) ann_categories.emplace_back(c);
    } else {
      ann_categories = o.snap_categories;
    }
    where = "the snaps given";
  } else {
    return Status::InvalidArgument("no snaps: give a snap directory");
  }
  if (snaps->empty()) return Status::InvalidArgument(where + " holds no snaps");
  if (static_cast<int64_t>(snaps->size()) > (int64_t{1} << 54)) return Status::InvalidArgument("too many snaps");
  DTRAIN_RETURN_IF_ERROR(CheckSnapImages(*snaps, where));
  const int snap_rows = snaps->front().rows, snap_cols = snaps->front().cols;
  const std::string snaps_description =
      (snap_dir.empty() ? std::string("snaps in memory") : "snaps " + snap_dir) + " (" +
      std::to_string(snaps->size()) + " snaps, " + std::to_string(snap_cols) + "x" + std::to_string(snap_rows) + ")";

  // 2. The models and the categories.
  internal::UseThreads(o.threads);
  models::CenterNet detector{nullptr};
  ModelConfig detector_config;
  std::string detector_source;
  std::vector<std::string> categories;
  if (!o.detector.empty()) {
    if (!fs::exists(o.detector, ec)) return Status::NotFound("detector " + o.detector + " does not exist");
    DTRAIN_RETURN_IF_ERROR(
        worker::LoadDetector(o.detector, &detector, &detector_config).WithContext("detector " + o.detector));
    detector_source = fs::absolute(o.detector).lexically_normal().string();
    categories = models::DetectorCategories(detector_config);
  } else if (o.boxes == SnapBoxes::kGroundTruth) {
    categories = ann_categories;
  } else {
    categories = {kWholeSnapCategory};
  }
  const std::string who = o.detector.empty() ? std::string("the index") : "the detector " + o.detector;
  // Annotation category -> index category.
  std::vector<int> ann_to_index(ann_categories.size(), -1);
  if (!whole) {
    for (size_t c = 0; c < ann_categories.size(); ++c) ann_to_index[c] = FindName(categories, ann_categories[c]);
    for (const data::Snap& s : *snaps) {
      for (const data::SnapItem& it : s.items) {
        if (it.category < 0 || it.category >= static_cast<int>(ann_categories.size())) {
          return Status::InvalidArgument(where + ": an item of " + SnapName(s) + " has category " +
                                         std::to_string(it.category) + ", outside the " +
                                         std::to_string(ann_categories.size()) + " categories");
        }
        if (ann_to_index[static_cast<size_t>(it.category)] < 0) {
          return Status::InvalidArgument(where + ": an item of " + SnapName(s) + " is of category '" +
                                         ann_categories[static_cast<size_t>(it.category)] + "', which " + who +
                                         " does not know (its categories: " + Join(categories) + ")");
        }
      }
    }
  }
  for (const auto& [name, source] : o.category_embedders) {
    if (FindName(categories, name) < 0) {
      return Status::InvalidArgument("an embedder is given for category '" + name + "', which " + who +
                                     " does not have (its categories: " + Join(categories) + ")");
    }
  }
  std::map<std::string, internal::LoadedModel> models_by_source;
  std::vector<CategoryItems> items(categories.size());
  for (size_t c = 0; c < categories.size(); ++c) {
    auto it = o.category_embedders.find(categories[c]);
    const std::string source = it != o.category_embedders.end() ? it->second : o.embedder;
    if (source.empty()) {
      return Status::InvalidArgument("no embedder for category '" + categories[c] +
                                     "': give a shared embedder or one for it (--embedder-for " + categories[c] +
                                     "=RUN_DIR)");
    }
    auto m = models_by_source.find(source);
    if (m == models_by_source.end()) {
      internal::LoadedModel lm;
      DTRAIN_RETURN_IF_ERROR(internal::LoadModelSource(source, false, &lm).WithContext("embedder of " + categories[c]));
      m = models_by_source.emplace(source, std::move(lm)).first;
    }
    items[c].model = &m->second;
    items[c].model_source = source;
    items[c].crops.rows = internal::kModelImageRows;
    items[c].crops.cols = internal::kModelImageCols;
    items[c].crops.source = categories[c] + " crops of " + snaps_description;
  }
  const int max_detections =
      o.max_detections > 0 ? o.max_detections
                           : std::min<int>(kMaxItemsPerSnap, detector ? detector_config.detector().max_detections() : 0);
  spdlog::info("indexing {} ({} boxes) into {}: categories {}", snaps_description, SnapBoxesName(o.boxes), out,
               Join(categories));

  // 3-4. The items of every snap, cropped.
  const auto t_index = std::chrono::steady_clock::now();
  std::vector<IndexedSnap> table(snaps->size());
  std::unique_ptr<ProgressBar> bar;
  if (o.progress) {
    ProgressOptions po;
    po.label = o.boxes == SnapBoxes::kDetected ? "detecting items" : "cropping items";
    po.total = static_cast<int64_t>(snaps->size());
    bar = std::make_unique<ProgressBar>(po);
  }
  const size_t batch = static_cast<size_t>(o.detect_batch_size);
  for (size_t begin = 0; begin < snaps->size(); begin += batch) {
    const size_t end = std::min(snaps->size(), begin + batch);
    std::vector<std::vector<models::DetectorBox>> found;
    if (o.boxes == SnapBoxes::kDetected) {
      std::vector<data::Snap> padded;
      padded.reserve(end - begin);
      for (size_t i = begin; i < end; ++i) padded.push_back(PadForDetector((*snaps)[i]));
      try {
        found = worker::Detect(*detector, padded, max_detections, o.min_score, o.detect_batch_size);
      } catch (const c10::Error& e) {
        return Status::Internal("detecting the items of " + SnapName((*snaps)[begin]) + ": " +
                                e.what_without_backtrace());
      }
    }
    for (size_t i = begin; i < end; ++i) {
      const data::Snap& s = (*snaps)[i];
      const int64_t ordinal = static_cast<int64_t>(i);
      IndexedSnap& row = table[i];
      row.id = s.id;
      row.file_name = s.file_name;
      if (whole) {
        data::SnapBox b;
        b.x1 = static_cast<float>(s.cols);
        b.y1 = static_cast<float>(s.rows);
        AddItem(s, ordinal, b, 0, 1.f, -1, -1, o.normalize_crops, &row, &items[0]);
      } else if (o.boxes == SnapBoxes::kGroundTruth) {
        if (static_cast<int64_t>(s.items.size()) > kMaxItemsPerSnap) {
          return Status::InvalidArgument(where + ": " + SnapName(s) + " has " + std::to_string(s.items.size()) +
                                         " items; a snap index takes at most " + std::to_string(kMaxItemsPerSnap));
        }
        for (const data::SnapItem& it : s.items) {
          const int c = ann_to_index[static_cast<size_t>(it.category)];
          AddItem(s, ordinal, it.box, c, 1.f, it.fine_class, it.source_index, o.normalize_crops, &row,
                  &items[static_cast<size_t>(c)]);
        }
      } else {
        for (const models::DetectorBox& d : found[i - begin]) {
          data::SnapBox b;
          b.x0 = std::clamp(d.x0, 0.f, static_cast<float>(s.cols));
          b.x1 = std::clamp(d.x1, 0.f, static_cast<float>(s.cols));
          b.y0 = std::clamp(d.y0, 0.f, static_cast<float>(s.rows));
          b.y1 = std::clamp(d.y1, 0.f, static_cast<float>(s.rows));
          if (b.width() < 1 || b.height() < 1) continue;
          if (d.category < 0 || d.category >= static_cast<int>(categories.size())) continue;
          // The annotated item it overlaps most, for its fine class and source.
          int fine = -1;
          int64_t source = -1;
          double best = 0.5;
          for (const data::SnapItem& it : s.items) {
            const double iou = BoxIoU({b.x0, b.y0, b.x1, b.y1}, {it.box.x0, it.box.y0, it.box.x1, it.box.y1});
            if (iou >= best) {
              best = iou;
              fine = it.fine_class;
              source = it.source_index;
            }
          }
          AddItem(s, ordinal, b, d.category, d.score, fine, source, o.normalize_crops, &row,
                  &items[static_cast<size_t>(d.category)]);
        }
      }
    }
    if (bar) bar->Update(static_cast<int64_t>(end));
  }
  if (bar) bar->Finish();
  const double detect_s = Since(t_index);
  int64_t found_items = 0;
  for (const CategoryItems& ci : items) found_items += ci.crops.size;
  if (found_items == 0) {
    return Status::FailedPrecondition(
        "no items to index in " + snaps_description + ": the detector found no box of at least 1 px with score >= " +
        std::to_string(o.min_score) + " (a lower min_score, or a better trained detector?)");
  }

  // 5. Embed every category's crops.
  const auto t_embed = std::chrono::steady_clock::now();
  for (size_t c = 0; c < categories.size(); ++c) {
    CategoryItems& ci = items[c];
    if (ci.crops.size == 0) continue;
    const auto t0 = std::chrono::steady_clock::now();
    DTRAIN_RETURN_IF_ERROR(internal::EmbedImages(*ci.model->model, ci.crops, o.embed_batch_size, o.progress,
                                                 "embedding " + categories[c], &ci.vectors));
    ci.embed_seconds = Since(t0);
  }
  const double embed_s = Since(t_embed);

  // 6-7. Write into a temporary sibling, then swap into place.
  const std::string building = UniqueSibling(out, ".tmp-");
  fs::remove_all(building, ec);
  fs::create_directories(building, ec);
  if (ec) return Status::IOError("cannot create " + building + ": " + ec.message());
  DirCleanup cleanup(building);
  json cats = json::array();
  int64_t total_items = 0;
  for (size_t c = 0; c < categories.size(); ++c) {
    const CategoryItems& ci = items[c];
    json j = {{"name", categories[c]}, {"items", ci.crops.size}, {"embedder", ci.model->description}};
    if (ci.crops.size > 0) {
      const std::string rel = CategoryDir(c, categories[c]);
      IndexManifest m;
      DTRAIN_RETURN_IF_ERROR(
          WriteCategoryIndex(building + "/" + rel, categories[c], snaps_description, o.kind, ci, &m));
      j["dir"] = rel;
      j["embedding_dim"] = m.embedding_dim();
    } else {
      spdlog::warn("no {} items in {}: queries of that category will find nothing", categories[c], snaps_description);
    }
    total_items += ci.crops.size;
    cats.push_back(std::move(j));
  }
  json root;
  root["format_version"] = kSnapIndexFormat;
  root["boxes"] = SnapBoxesName(o.boxes);
  root["normalize_crops"] = o.normalize_crops;
  root["pixel_weight"] = o.pixel_weight;
  root["pixel_descriptor"] = {{"kind", kTemplateKind},
                              {"file", kItemTemplateFile},
                              {"side", kItemTemplateSide},
                              {"mask_threshold", kItemMaskThreshold},
                              {"max_shift", kTemplateMaxShift}};
  root["categories"] = std::move(cats);
  if (detector) {
    DTRAIN_RETURN_IF_ERROR(worker::SaveModel(*detector, detector_config, building + "/" + kDetectorFile));
    std::string digest;
    DTRAIN_RETURN_IF_ERROR(internal::FileDigest(building + "/" + kDetectorFile, &digest));
    root["detector"] = {{"file", kDetectorFile}, {"source", detector_source}, {"digest", digest}};
  }
  if (o.boxes == SnapBoxes::kDetected) {
    root["max_detections"] = max_detections;
    root["min_score"] = o.min_score;
  }
  root["snap_dir"] = snap_dir;
  root["snap_rows"] = snap_rows;
  root["snap_cols"] = snap_cols;
  root["snap_count"] = static_cast<int64_t>(snaps->size());
  root["item_count"] = total_items;
  root["created_unix"] = static_cast<int64_t>(std::time(nullptr));
  root["detect_seconds"] = detect_s;
  root["embed_seconds"] = embed_s;
  // The snap table: id, file, then one [x0, y0, x1, y1, category, score] per item.
  json rows = json::array();
  for (const IndexedSnap& s : table) {
    json its = json::array();
    for (const IndexedItem& it : s.items) {
      its.push_back({it.box.x0, it.box.y0, it.box.x1, it.box.y1, it.category, it.score});
    }
    rows.push_back({{"id", s.id}, {"file", s.file_name}, {"items", std::move(its)}});
  }
  root["snaps"] = std::move(rows);
  DTRAIN_RETURN_IF_ERROR(WriteFileAtomically(building + "/" + kSnapIndexFile, root.dump(1) + "\n"));
  DTRAIN_RETURN_IF_ERROR(internal::SwapIntoPlace(building, out, "snap index"));
  cleanup.Release();
  const double index_s = Since(t_index);

  SnapIndexSummary sum;
  sum.snaps = static_cast<int64_t>(snaps->size());
  sum.items = total_items;
  sum.categories = categories;
  for (const CategoryItems& ci : items) sum.items_per_category.push_back(ci.crops.size);
  sum.detect_seconds = detect_s;
  sum.embed_seconds = embed_s;
  sum.index_seconds = index_s;
  sum.snaps_per_sec = sum.snaps / std::max(index_s, 1e-9);
  spdlog::info("snap index written to {}: {} snaps, {} items in {:.1f} s ({:.0f} snaps/s)", out, sum.snaps, sum.items,
               index_s, sum.snaps_per_sec);
  if (summary) *summary = std::move(sum);
  return Status::OK();
}

// ---- SnapIndex ----------------------------------------------------------------------

struct SnapIndex::Detector {
  models::CenterNet model{nullptr};
  ModelConfig config;
  // worker::Detect switches the module to eval mode (a write); calls are
  // serialised.
  std::mutex mu;
};

struct SnapIndex::Pixels {
  std::unordered_map<int64_t, int64_t> row_of;  // item id -> row
  std::vector<uint8_t> rows;                    // kItemTemplatePixels per row

  const uint8_t* Find(int64_t id) const {
    auto it = row_of.find(id);
    return it == row_of.end() ? nullptr : rows.data() + it->second * kItemTemplatePixels;
  }
};

namespace {

// Reads templates.u8 of a category of `count` items; Corruption (naming
// the file) unless it is whole and agrees with the count.
Status ReadTemplateFile(const std::string& path, int64_t count, std::vector<int64_t>* ids,
                        std::vector<uint8_t>* rows) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return Status::Corruption(path + " is missing (the item templates)");
  const int64_t size = static_cast<int64_t>(fs::file_size(path, ec));
  if (ec) return Status::IOError("cannot stat " + path + ": " + ec.message());
  if (size != TemplateFileBytes(count)) {
    return Status::Corruption(path + " has " + std::to_string(size) + " bytes but " + std::to_string(count) +
                              " items of " + std::to_string(kItemTemplateSide) + "x" +
                              std::to_string(kItemTemplateSide) + " templates take " +
                              std::to_string(TemplateFileBytes(count)));
  }
  std::ifstream in(path, std::ios::binary);
  char magic[8];
  int32_t side = 0, reserved = 0;
  int64_t n = -1;
  in.read(magic, sizeof magic);
  in.read(reinterpret_cast<char*>(&side), sizeof side);
  in.read(reinterpret_cast<char*>(&reserved), sizeof reserved);
  in.read(reinterpret_cast<char*>(&n), sizeof n);
  if (!in || std::memcmp(magic, kTemplateMagic, sizeof magic) != 0) {
    return Status::Corruption(path + " is not an item template file (bad header)");
  }
  if (side != kItemTemplateSide || n != count) {
    return Status::Corruption(path + " holds " + std::to_string(n) + " templates of side " + std::to_string(side) +
                              ", expected " + std::to_string(count) + " of side " + std::to_string(kItemTemplateSide));
  }
  ids->resize(static_cast<size_t>(count));
  rows->resize(static_cast<size_t>(count) * kItemTemplatePixels);
  in.read(reinterpret_cast<char*>(ids->data()), static_cast<std::streamsize>(ids->size() * sizeof(int64_t)));
  in.read(reinterpret_cast<char*>(rows->data()), static_cast<std::streamsize>(rows->size()));
  if (!in) return Status::Corruption("cannot read the " + std::to_string(count) + " templates of " + path);
  return Status::OK();
}

}  // namespace

SnapIndex::~SnapIndex() = default;

bool SnapIndex::has_detector() const { return detector_ != nullptr; }

int64_t SnapIndex::items(int category) const {
  if (category < 0 || category >= static_cast<int>(searchers_.size()) || !searchers_[static_cast<size_t>(category)]) {
    return 0;
  }
  return searchers_[static_cast<size_t>(category)]->manifest().count();
}

std::string SnapIndex::Describe() const { return description_; }

Status SnapIndex::Open(const SnapIndexOpenOptions& options, std::unique_ptr<SnapIndex>* out) {
  const std::string& dir = options.index_dir;
  std::error_code ec;
  if (!fs::exists(dir, ec)) return Status::NotFound("snap index directory " + dir + " does not exist");
  const std::string path = (fs::path(dir) / kSnapIndexFile).string();
  if (!fs::is_regular_file(path, ec)) {
    return Status::NotFound(dir + " is not a snap index (no " + kSnapIndexFile +
                            "; a build that did not finish leaves none)");
  }
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  if (!in) return Status::IOError("cannot read " + path);
  std::unique_ptr<SnapIndex> s(new SnapIndex());
  s->dir_ = dir;
  std::vector<std::string> category_dirs;
  std::vector<int64_t> category_items;
  std::string detector_file, detector_digest, detector_source;
  std::string pixel_file;
  try {
    const json root = json::parse(ss.str());
    const int version = root.at("format_version").get<int>();
    if (version != kSnapIndexFormat) {
      return Status::FailedPrecondition(path + ": snap index format " + std::to_string(version) +
                                        " is not supported by this dtrain (" + std::to_string(kSnapIndexFormat) + ")");
    }
    if (!ParseSnapBoxes(root.at("boxes").get<std::string>(), &s->boxes_)) {
      return Status::Corruption(path + ": unknown boxes '" + root.at("boxes").get<std::string>() + "'");
    }
    for (const json& c : root.at("categories")) {
      s->categories_.push_back(c.at("name").get<std::string>());
      category_items.push_back(c.at("items").get<int64_t>());
      category_dirs.push_back(c.contains("dir") ? c.at("dir").get<std::string>() : "");
    }
    if (root.contains("detector")) {
      detector_file = root["detector"].at("file").get<std::string>();
      detector_digest = root["detector"].at("digest").get<std::string>();
      detector_source = root["detector"].at("source").get<std::string>();
    }
    s->normalize_crops_ = root.at("normalize_crops").get<bool>();
    if (root.contains("pixel_descriptor") && !root.at("pixel_descriptor").contains("kind")) {
      spdlog::warn("{}: written before item templates (its 14x14 pixel descriptors are no longer used): query it "
                   "with pixel and instance weights 0 (the embedding alone), or build it again",
                   path);
    } else if (root.contains("pixel_descriptor")) {
      const json& pd = root.at("pixel_descriptor");
      pixel_file = pd.at("file").get<std::string>();
      if (pd.at("kind").get<std::string>() != kTemplateKind || pd.at("side").get<int>() != kItemTemplateSide ||
          pd.at("mask_threshold").get<int>() != kItemMaskThreshold ||
          pd.at("max_shift").get<int>() != kTemplateMaxShift) {
        return Status::Corruption(path + ": pixel_descriptor " + pd.dump() + " is not this dtrain's (" + kTemplateKind +
                                  ", side " + std::to_string(kItemTemplateSide) + ", mask_threshold " +
                                  std::to_string(kItemMaskThreshold) + ", max_shift " +
                                  std::to_string(kTemplateMaxShift) + ")");
      }
      s->pixel_weight_ = root.at("pixel_weight").get<float>();
      if (!(s->pixel_weight_ >= 0 && s->pixel_weight_ <= 1)) {
        return Status::Corruption(path + ": pixel_weight " + std::to_string(s->pixel_weight_) + " is outside [0, 1]");
      }
    }
    s->snap_dir_ = root.at("snap_dir").get<std::string>();
    s->snap_rows_ = root.at("snap_rows").get<int>();
    s->snap_cols_ = root.at("snap_cols").get<int>();
    const int ncat = static_cast<int>(s->categories_.size());
    for (const json& r : root.at("snaps")) {
      IndexedSnap snap;
      snap.id = r.at("id").get<int64_t>();
      snap.file_name = r.at("file").get<std::string>();
      for (const json& it : r.at("items")) {
        IndexedItem item;
        item.box.x0 = it.at(0).get<float>();
        item.box.y0 = it.at(1).get<float>();
        item.box.x1 = it.at(2).get<float>();
        item.box.y1 = it.at(3).get<float>();
        item.category = it.at(4).get<int>();
        item.score = it.at(5).get<float>();
        if (item.category < 0 || item.category >= ncat) {
          return Status::Corruption(path + ": an item of snap " + std::to_string(snap.id) + " has category " +
                                    std::to_string(item.category) + " of " + std::to_string(ncat));
        }
        snap.items.push_back(item);
      }
      s->snaps_.push_back(std::move(snap));
    }
    if (static_cast<int64_t>(s->snaps_.size()) != root.at("snap_count").get<int64_t>()) {
      return Status::Corruption(path + ": the snap table holds " + std::to_string(s->snaps_.size()) +
                                " snaps but snap_count says " + std::to_string(root.at("snap_count").get<int64_t>()));
    }
  } catch (const nlohmann::json::exception& e) {
    return Status::Corruption(path + " does not parse as a snap index: " + e.what());
  }
  if (s->categories_.empty()) return Status::Corruption(path + " lists no categories");
  // The category indexes.
  for (size_t c = 0; c < s->categories_.size(); ++c) {
    if (category_dirs[c].empty()) {
      s->searchers_.push_back(nullptr);
      s->pixels_.push_back(nullptr);
      continue;
    }
    SearcherOptions so;
    so.index_dir = (fs::path(dir) / category_dirs[c]).string();
    so.threads = options.threads;
    std::unique_ptr<Searcher> searcher;
    DTRAIN_RETURN_IF_ERROR(Searcher::Open(so, &searcher).WithContext("category " + s->categories_[c]));
    if (searcher->manifest().count() != category_items[c]) {
      return Status::Corruption(so.index_dir + " holds " + std::to_string(searcher->manifest().count()) +
                                " items but " + path + " says " + std::to_string(category_items[c]));
    }
    s->searchers_.push_back(std::move(searcher));
    if (pixel_file.empty()) {
      s->pixels_.push_back(nullptr);
      continue;
    }
    auto px = std::make_unique<Pixels>();
    std::vector<int64_t> ids;
    const std::string pixel_path = (fs::path(so.index_dir) / pixel_file).string();
    DTRAIN_RETURN_IF_ERROR(ReadTemplateFile(pixel_path, category_items[c], &ids, &px->rows));
    for (size_t r = 0; r < ids.size(); ++r) {
      if (!px->row_of.emplace(ids[r], static_cast<int64_t>(r)).second) {
        return Status::Corruption(pixel_path + " lists item " + std::to_string(ids[r]) + " twice");
      }
    }
    s->pixels_.push_back(std::move(px));
  }
  // The detector.
  if (!detector_file.empty()) {
    const std::string file = (fs::path(dir) / detector_file).string();
    std::string digest;
    DTRAIN_RETURN_IF_ERROR(internal::FileDigest(file, &digest));
    if (digest != detector_digest) {
      return Status::Corruption(file + " has crc32c " + digest + " but " + path + " says " + detector_digest);
    }
    s->detector_ = std::make_unique<Detector>();
    DTRAIN_RETURN_IF_ERROR(worker::LoadDetector(file, &s->detector_->model, &s->detector_->config));
    if (models::DetectorCategories(s->detector_->config) != s->categories_) {
      return Status::Corruption(file + ": the detector's categories (" +
                                Join(models::DetectorCategories(s->detector_->config)) + ") are not the index's (" +
                                Join(s->categories_) + ")");
    }
  }
  internal::UseThreads(options.threads);
  int64_t total = 0;
  std::string per;
  for (size_t c = 0; c < s->categories_.size(); ++c) {
    total += category_items[c];
    per += (c ? ", " : "") + s->categories_[c] + " " + std::to_string(category_items[c]);
  }
  std::string upper = SnapBoxesName(s->boxes_);
  for (char& ch : upper) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  s->description_ = upper + " snap index of " + std::to_string(s->snaps_.size()) + " snaps, " + std::to_string(total) +
                    " items (" + per + ")" +
                    (s->detector_ ? ", detector " + detector_source : std::string(", no detector")) +
                    (s->snap_dir_.empty() ? "" : ", snaps in " + s->snap_dir_);
  *out = std::move(s);
  return Status::OK();
}

Status SnapIndex::PredictCategory(const data::GrayImage& product, int* category, float* score) const {
  if (!detector_) return Status::FailedPrecondition(dir_ + " has no detector to predict a product's category");
  if (product.rows < 1 || product.cols < 1 ||
      product.pixels.size() != static_cast<size_t>(product.rows) * static_cast<size_t>(product.cols)) {
    return Status::InvalidArgument("the product image is empty or its pixels do not match its size");
  }
  std::vector<int> categories;
  std::vector<float> scores;
  DTRAIN_RETURN_IF_ERROR(PredictCategories({ProductInput(product)}, &categories, &scores));
  *category = categories[0];
  *score = scores[0];
  return Status::OK();
}

Status SnapIndex::PredictCategories(const std::vector<data::GrayImage>& inputs, std::vector<int>* categories,
                                    std::vector<float>* scores) const {
  constexpr size_t kBatch = 64;
  categories->assign(inputs.size(), -1);
  scores->assign(inputs.size(), 0.f);
  for (size_t begin = 0; begin < inputs.size(); begin += kBatch) {
    const size_t end = std::min(inputs.size(), begin + kBatch);
    std::vector<data::Snap> canvases;
    for (size_t i = begin; i < end; ++i) {
      const data::GrayImage& in = inputs[i];
      data::Snap canvas = Canvas(std::max(snap_rows_, in.rows), std::max(snap_cols_, in.cols));
      const int r0 = (canvas.rows - in.rows) / 2, c0 = (canvas.cols - in.cols) / 2;
      for (int y = 0; y < in.rows; ++y) {
        std::copy_n(in.pixels.data() + static_cast<size_t>(y) * in.cols, in.cols,
                    canvas.pixels.data() + static_cast<size_t>(r0 + y) * canvas.cols + c0);
      }
      canvases.push_back(std::move(canvas));
    }
    std::vector<std::vector<models::DetectorBox>> found;
    try {
      std::lock_guard<std::mutex> lock(detector_->mu);
      found = worker::Detect(*detector_->model, canvases, 1, 0.f, static_cast<int>(kBatch));
    } catch (const c10::Error& e) {
      return Status::Internal(std::string("predicting the products' categories: ") + e.what_without_backtrace());
    }
    for (size_t i = begin; i < end && i - begin < found.size(); ++i) {
      if (found[i - begin].empty()) continue;
      (*categories)[i] = found[i - begin][0].category;
      (*scores)[i] = found[i - begin][0].score;
    }
  }
  return Status::OK();
}

Status SnapIndex::ReadSnapImage(int64_t snap_ordinal, data::GrayImage* image) const {
  if (snap_ordinal < 0 || snap_ordinal >= static_cast<int64_t>(snaps_.size())) {
    return Status::InvalidArgument("snap " + std::to_string(snap_ordinal) + " is outside the index's " +
                                   std::to_string(snaps_.size()) + " snaps");
  }
  const IndexedSnap& s = snaps_[static_cast<size_t>(snap_ordinal)];
  if (snap_dir_.empty() || s.file_name.empty()) {
    return Status::FailedPrecondition(dir_ + " was built from snaps in memory; it has no files to show them from");
  }
  const std::string path = (fs::path(snap_dir_) / s.file_name).string();
  std::error_code ec;
  if (!fs::exists(path, ec)) {
    return Status::NotFound("snap " + path + " (indexed in " + dir_ + ") does not exist any more");
  }
  return data::ReadGrayImage(path, image);
}

Status SnapIndex::Query(const data::GrayImage& product, const SnapQueryOptions& options,
                        SnapQueryResult* result) const {
  std::vector<SnapQueryResult> results;
  DTRAIN_RETURN_IF_ERROR(QueryBatch({product}, options, &results));
  *result = std::move(results[0]);
  return Status::OK();
}

Status SnapIndex::QueryBatch(const std::vector<data::GrayImage>& products, const SnapQueryOptions& options,
                             std::vector<SnapQueryResult>* results) const {
  const int k = options.k;
  if (k < 1 || k > kMaxQueryK) {
    return Status::InvalidArgument("k must be in [1, " + std::to_string(kMaxQueryK) + "], got " + std::to_string(k));
  }
  if (products.empty()) return Status::InvalidArgument("no product images");
  if (options.pixel_weight != -1.f && !(options.pixel_weight >= 0 && options.pixel_weight <= 1)) {
    return Status::InvalidArgument("pixel_weight must be in [0, 1] (or -1: the index's " +
                                   std::to_string(pixel_weight_) + "), got " + std::to_string(options.pixel_weight));
  }
  if (options.rerank_depth < 0) {
    return Status::InvalidArgument("rerank_depth must be >= 0, got " + std::to_string(options.rerank_depth));
  }
  if (!(options.instance_weight >= 0 && options.instance_weight <= 1)) {
    return Status::InvalidArgument("instance_weight must be in [0, 1], got " + std::to_string(options.instance_weight));
  }
  if (!(options.instance_threshold >= 0 && options.instance_threshold < 1)) {
    return Status::InvalidArgument("instance_threshold must be in [0, 1), got " +
                                   std::to_string(options.instance_threshold));
  }
  if (!(options.instance_margin >= 0)) {
    return Status::InvalidArgument("instance_margin must be >= 0, got " + std::to_string(options.instance_margin));
  }
  const float w = options.pixel_weight == -1.f ? pixel_weight_ : options.pixel_weight;
  // Templates are compared when either pixel term counts.
  const bool match = w > 0 || options.instance_weight > 0;
  const float gamma = options.instance_weight, tau = options.instance_threshold;
  const float margin = options.instance_margin;
  if (match) {
    for (size_t c = 0; c < pixels_.size(); ++c) {
      if (searchers_[c] && !pixels_[c]) {
        return Status::FailedPrecondition(dir_ + " has no item templates (written before them): query it with "
                                          "pixel_weight and instance_weight 0 (dtrain snap query --pixel-weight 0 "
                                          "--instance-weight 0: the embedding alone), or build it again");
      }
    }
  }
  const size_t n = products.size();
  // 1. The 28x28 inputs.
  std::vector<data::GrayImage> inputs(n);
  for (size_t i = 0; i < n; ++i) {
    const data::GrayImage& p = products[i];
    if (p.rows < 1 || p.cols < 1 || p.pixels.size() != static_cast<size_t>(p.rows) * static_cast<size_t>(p.cols)) {
      return Status::InvalidArgument("product image " + std::to_string(i) + " is empty or its " +
                                     std::to_string(p.pixels.size()) + " pixels do not make " + std::to_string(p.cols) +
                                     "x" + std::to_string(p.rows));
    }
    inputs[i] = ProductInput(p);
  }
  // 2. The category of each.
  std::vector<SnapQueryResult> out(n);
  const auto t_predict = std::chrono::steady_clock::now();
  if (!options.category.empty()) {
    const int c = FindName(categories_, options.category);
    if (c < 0) {
      return Status::InvalidArgument("unknown category '" + options.category + "'; the index has " +
                                     Join(categories_));
    }
    for (SnapQueryResult& r : out) {
      r.category = c;
      r.category_source = "given";
    }
  } else if (categories_.size() == 1) {
    for (SnapQueryResult& r : out) {
      r.category = 0;
      r.category_source = "only";
    }
  } else if (detector_) {
    std::vector<int> cats;
    std::vector<float> scores;
    DTRAIN_RETURN_IF_ERROR(PredictCategories(inputs, &cats, &scores));
    for (size_t i = 0; i < n; ++i) {
      out[i].category = cats[i];
      out[i].category_source = cats[i] >= 0 ? "predicted" : "all";
      out[i].category_score = scores[i];
    }
  } else {
    for (SnapQueryResult& r : out) r.category_source = "all";
  }
  const double predict_s = Since(t_predict);
  for (SnapQueryResult& r : out) {
    r.category_name = r.category >= 0 ? categories_[static_cast<size_t>(r.category)] : "";
    r.predict_seconds = predict_s;
  }
  // 3. Search each category's index for the queries that go to it.
  double embed_s = 0, search_s = 0;
  struct Candidate {
    float similarity;  // the combined score (step 4)
    int64_t id;
    int category;
    float embedding;
    float pixel;
  };
  // The products' templates (step 4), of the raw product images.
  std::vector<TemplateMatcher> matchers;
  if (match) {
    matchers.reserve(n);
    for (size_t i = 0; i < n; ++i) matchers.emplace_back(ProductTemplate(products[i]));
  }
  std::vector<std::vector<Candidate>> candidates(n);
  for (size_t c = 0; c < categories_.size(); ++c) {
    const Searcher* searcher = searchers_[c].get();
    if (!searcher) continue;
    std::vector<size_t> which;
    for (size_t i = 0; i < n; ++i) {
      if (out[i].category < 0 || out[i].category == static_cast<int>(c)) which.push_back(i);
    }
    if (which.empty()) continue;
    data::Dataset batch;
    batch.rows = internal::kModelImageRows;
    batch.cols = internal::kModelImageCols;
    batch.source = "product images";
    for (size_t i : which) {
      data::GrayImage in = inputs[i];
      if (normalize_crops_) NormalizeCrop(&in);
      batch.images.insert(batch.images.end(), in.pixels.begin(), in.pixels.end());
      batch.labels.push_back(0);
      ++batch.size;
    }
    const auto t_embed = std::chrono::steady_clock::now();
    std::vector<float> emb;
    DTRAIN_RETURN_IF_ERROR(searcher->Embed(batch, &emb));
    embed_s += Since(t_embed);
    const auto t_search = std::chrono::steady_clock::now();
    const int64_t count = searcher->manifest().count();
    const int dim = searcher->manifest().embedding_dim();
    const bool hnsw = searcher->index().kind() == IndexConfig::HNSW;
    // Deep enough for k distinct snaps: start at 4k + 16 items (at least
    // rerank_depth when re-ranking), deepen the queries that found fewer
    // snaps until the index is exhausted.
    int64_t depth = 4 * static_cast<int64_t>(k) + 16;
    if (match) depth = std::max<int64_t>(depth, options.rerank_depth);
    depth = std::min<int64_t>(count, depth);
    const Pixels* pixels = pixels_[c].get();
    std::vector<size_t> pending(which.size());
    for (size_t j = 0; j < which.size(); ++j) pending[j] = j;
    while (!pending.empty()) {
      std::vector<float> q;
      q.reserve(pending.size() * static_cast<size_t>(dim));
      for (size_t j : pending) q.insert(q.end(), emb.begin() + j * dim, emb.begin() + (j + 1) * dim);
      std::vector<float> scores;
      std::vector<int64_t> ids;
      DTRAIN_RETURN_IF_ERROR(searcher->index().Search(q.data(), static_cast<int64_t>(pending.size()),
                                                      static_cast<int>(depth), &scores, &ids,
                                                      hnsw ? static_cast<int>(depth) : 0));
      std::vector<size_t> again;
      for (size_t p = 0; p < pending.size(); ++p) {
        std::set<int64_t> distinct;
        std::vector<Candidate> found;
        for (int64_t j = 0; j < depth; ++j) {
          const int64_t id = ids[p * static_cast<size_t>(depth) + static_cast<size_t>(j)];
          if (id < 0) break;
          const float e = scores[p * static_cast<size_t>(depth) + static_cast<size_t>(j)];
          float px = 0;
          if (match) {
            const uint8_t* item = pixels->Find(id);
            if (!item) {
              return Status::Corruption(dir_ + ": item " + std::to_string(id) + " of category " + categories_[c] +
                                        " has no template in " + kItemTemplateFile);
            }
            px = matchers[which[pending[p]]].Score(item);
          }
          found.push_back({(1 - w) * e + w * px, id, static_cast<int>(c), e, px});
          distinct.insert(id / kMaxItemsPerSnap);
        }
        if (match && gamma > 0) {
          // The instance bonus, for the items whose template similarity is
          // within instance_margin of the best candidate's.
          float best = -1;
          for (const Candidate& f : found) best = std::max(best, f.pixel);
          for (Candidate& f : found) {
            if (f.pixel >= best - margin) f.similarity += gamma * std::clamp((f.pixel - tau) / (1 - tau), 0.f, 1.f);
          }
        }
        if (static_cast<int>(distinct.size()) < k && depth < count) {
          again.push_back(pending[p]);
        } else {
          auto& cand = candidates[which[pending[p]]];
          cand.insert(cand.end(), found.begin(), found.end());
        }
      }
      pending = std::move(again);
      depth = std::min<int64_t>(count, depth * 4);
    }
    search_s += Since(t_search);
  }
  // 5. Rank snaps by their best item (step 4's scores).
  for (size_t i = 0; i < n; ++i) {
    auto& cand = candidates[i];
    std::stable_sort(cand.begin(), cand.end(),
                     [](const Candidate& a, const Candidate& b) { return a.similarity > b.similarity; });
    std::set<int64_t> seen;
    for (const Candidate& cd : cand) {
      if (static_cast<int>(out[i].matches.size()) >= k) break;
      const int64_t ordinal = cd.id / kMaxItemsPerSnap;
      const int64_t item_ordinal = cd.id % kMaxItemsPerSnap;
      if (!seen.insert(ordinal).second) continue;
      if (ordinal >= static_cast<int64_t>(snaps_.size()) ||
          item_ordinal >= static_cast<int64_t>(snaps_[static_cast<size_t>(ordinal)].items.size())) {
        return Status::Corruption(dir_ + ": item id " + std::to_string(cd.id) + " of category " +
                                  categories_[static_cast<size_t>(cd.category)] + " is not in the snap table");
      }
      const IndexedSnap& snap = snaps_[static_cast<size_t>(ordinal)];
      SnapMatch m;
      m.snap_id = snap.id;
      m.snap_ordinal = ordinal;
      m.file_name = snap.file_name;
      m.item_id = cd.id;
      m.item = snap.items[static_cast<size_t>(item_ordinal)];
      m.category_name = categories_[static_cast<size_t>(m.item.category)];
      m.similarity = cd.similarity;
      m.embedding_similarity = cd.embedding;
      m.pixel_similarity = cd.pixel;
      ItemMeta meta;
      DTRAIN_RETURN_IF_ERROR(searchers_[static_cast<size_t>(cd.category)]->Lookup(cd.id, &meta));
      m.fine_class = meta.label();
      m.source_index = meta.dataset_index();
      out[i].matches.push_back(std::move(m));
    }
    out[i].embed_seconds = embed_s;
    out[i].search_seconds = search_s;
  }
  *results = std::move(out);
  return Status::OK();
}

// ---- pictures --------------------------------------------------------------------

Status DrawSnapResults(const data::GrayImage& product, const SnapQueryResult& result,
                       const std::vector<const IndexedSnap*>& snaps, const std::vector<data::GrayImage>& snap_images,
                       const SnapPictureOptions& o, data::RgbImage* out) {
  const size_t n = result.matches.size();
  if (snaps.size() != n || snap_images.size() != n) {
    return Status::InvalidArgument("a picture of " + std::to_string(n) + " matches needs as many snaps and images, got " +
                                   std::to_string(snaps.size()) + " and " + std::to_string(snap_images.size()));
  }
  if (product.rows < 1 || product.cols < 1 ||
      product.pixels.size() != static_cast<size_t>(product.rows) * static_cast<size_t>(product.cols)) {
    return Status::InvalidArgument("the product image is empty");
  }
  if (o.columns < 1 || o.gap < 0 || o.match_line < 1 || o.other_line < 1) {
    return Status::InvalidArgument("picture options: columns and line widths must be >= 1, gap >= 0");
  }
  int tile_h = 0, tile_w = 0;
  for (size_t i = 0; i < n; ++i) {
    const data::GrayImage& g = snap_images[i];
    if (g.rows < 1 || g.cols < 1 || g.pixels.size() != static_cast<size_t>(g.rows) * static_cast<size_t>(g.cols)) {
      return Status::InvalidArgument("the image of match " + std::to_string(i) + " is empty");
    }
    if (!snaps[i]) return Status::InvalidArgument("match " + std::to_string(i) + " has no snap");
    tile_h = std::max(tile_h, g.rows);
    tile_w = std::max(tile_w, g.cols);
  }
  if (n == 0) tile_h = tile_w = std::max({product.rows, product.cols, 112});
  constexpr int kBar = 4;
  const int product_side = tile_h;
  data::SnapBox whole;
  whole.x1 = static_cast<float>(product.cols);
  whole.y1 = static_cast<float>(product.rows);
  const data::GrayImage shown = CropSquare(product.pixels.data(), product.rows, product.cols, whole, product_side);
  const int columns = std::max<int>(1, std::min<int>(o.columns, static_cast<int>(std::max<size_t>(n, 1))));
  const int grid_rows = static_cast<int>((n + static_cast<size_t>(columns) - 1) / static_cast<size_t>(columns));
  const int left = o.gap + product_side + 2 * o.gap;
  const int cell_h = tile_h + 2 + kBar + o.gap;
  data::RgbImage img;
  img.cols = left + columns * (tile_w + o.gap);
  img.rows = o.gap + std::max(1, grid_rows) * cell_h;
  img.rows = std::max(img.rows, o.gap + product_side + o.gap);
  img.pixels.assign(static_cast<size_t>(img.rows) * img.cols * 3, 255);
  data::RgbCanvas cv(&img);
  cv.Gray(o.gap, o.gap, shown);
  const uint8_t track[3] = {225, 225, 225};
  for (size_t i = 0; i < n; ++i) {
    const SnapMatch& m = result.matches[i];
    const int y0 = o.gap + static_cast<int>(i / static_cast<size_t>(columns)) * cell_h;
    const int x0 = left + static_cast<int>(i % static_cast<size_t>(columns)) * (tile_w + o.gap);
    const data::GrayImage& g = snap_images[i];
    cv.Gray(y0, x0, g);
    const int64_t matched = m.item_id % kMaxItemsPerSnap;
    const auto& its = snaps[i]->items;
    for (size_t j = 0; j < its.size(); ++j) {
      if (static_cast<int64_t>(j) != matched) cv.Box(y0, x0, g.rows, g.cols, its[j].box, o.other_line, o.other_rgb);
    }
    cv.Box(y0, x0, g.rows, g.cols, m.item.box, o.match_line, o.match_rgb);
    const int bar_y = y0 + g.rows + 2;
    cv.Fill(bar_y, x0, kBar, g.cols, track);
    const int len = static_cast<int>(std::lround(std::clamp(m.similarity, 0.f, 1.f) * g.cols));
    cv.Fill(bar_y, x0, kBar, len, o.match_rgb);
  }
  *out = std::move(img);
  return Status::OK();
}

}  // namespace dtrain::indexer
