#include "dtrain/data/snaps.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <unordered_map>

#include "dtrain/common/metrics_log.h"
#include "dtrain/data/image_io.h"
#include "dtrain/data/transforms.h"

namespace dtrain::data {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr char kAnnotationsFile[] = "annotations.json";

// A scaled item pixel above this value belongs to the item (its mask); the
// rest of the item's square shows the background.
constexpr int kItemThreshold = 20;
// Placement attempts per item: positions per draw of (image, scale), and
// draws per item. An item that finds no place is left out.
constexpr int kPositionsPerDraw = 12;
constexpr int kDrawsPerItem = 8;
// A new item may hide at most this share of an earlier item's mask pixels
// (counted with every item placed so far): each item keeps at least 60% of
// its pixels visible.
constexpr double kMinVisibleShare = 0.6;
constexpr int kMaxItemsLimit = 64;

uint8_t ClampByte(double v) { return static_cast<uint8_t>(std::clamp(std::lround(v), 0L, 255L)); }

// Uniform in [lo, hi).
double UniformIn(Rng* rng, double lo, double hi) { return lo + (hi - lo) * rng->UniformDouble(); }

// Approximately normal (Irwin-Hall of 4 uniforms), mean 0, std 1.
double Gaussianish(Rng* rng) {
  double s = 0;
  for (int i = 0; i < 4; ++i) s += rng->UniformDouble();
  return (s - 2.0) * std::sqrt(3.0);
}

// A triangle wave of period 1 in [0, 1].
double Triangle(double t) {
  const double f = t - std::floor(t);
  return f < 0.5 ? 2 * f : 2 - 2 * f;
}

// Fills a canvas x canvas background at lowish intensity (below ~120) so
// that items stay visible: a smooth gradient, stripes, low-frequency blotches
// or plain noise, each with a little noise on top.
void DrawBackground(int canvas, Rng* rng, std::vector<double>* bg) {
  const size_t n = static_cast<size_t>(canvas) * canvas;
  bg->assign(n, 0.0);
  const int kind = static_cast<int>(rng->Uniform(4));
  const double base = UniformIn(rng, 5, 60);
  double noise_std = UniformIn(rng, 1, 5);
  switch (kind) {
    case 0: {  // gradient along a random direction
      const double gx = UniformIn(rng, -1, 1);
      const double gy = UniformIn(rng, -1, 1);
      const double amplitude = UniformIn(rng, 10, 60);
      const double norm = (std::fabs(gx) + std::fabs(gy)) * canvas + 1e-9;
      for (int y = 0; y < canvas; ++y) {
        for (int x = 0; x < canvas; ++x) {
          const double t = (gx * x + gy * y) / norm + 0.5;  // in [0, 1]
          (*bg)[static_cast<size_t>(y) * canvas + x] = base + amplitude * t;
        }
      }
      break;
    }
    case 1: {  // stripes: a triangle wave along a random direction
      const double dx = UniformIn(rng, -1, 1);
      const double dy = UniformIn(rng, -1, 1);
      const double len = std::sqrt(dx * dx + dy * dy) + 1e-9;
      const double period = UniformIn(rng, 6, 32);
      const double phase = rng->UniformDouble();
      const double amplitude = UniformIn(rng, 10, 45);
      for (int y = 0; y < canvas; ++y) {
        for (int x = 0; x < canvas; ++x) {
          const double t = (dx * x + dy * y) / len / period + phase;
          (*bg)[static_cast<size_t>(y) * canvas + x] = base + amplitude * Triangle(t);
        }
      }
      break;
    }
    case 2: {  // blotches: a coarse grid of random values, bilinearly upsampled
      const int grid = 3 + static_cast<int>(rng->Uniform(5));  // 3..7 cells a side
      const double amplitude = UniformIn(rng, 15, 60);
      std::vector<double> g(static_cast<size_t>(grid + 1) * (grid + 1));
      for (double& v : g) v = rng->UniformDouble();
      const double cell = static_cast<double>(canvas) / grid;
      for (int y = 0; y < canvas; ++y) {
        const double gy = y / cell;
        const int y0 = std::min(static_cast<int>(gy), grid - 1);
        const double fy = gy - y0;
        for (int x = 0; x < canvas; ++x) {
          const double gx = x / cell;
          const int x0 = std::min(static_cast<int>(gx), grid - 1);
          const double fx = gx - x0;
          auto at = [&](int r, int c) { return g[static_cast<size_t>(r) * (grid + 1) + c]; };
          const double top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx;
          const double bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx;
          (*bg)[static_cast<size_t>(y) * canvas + x] = base + amplitude * (top * (1 - fy) + bottom * fy);
        }
      }
      break;
    }
    default:  // noise
      for (double& v : *bg) v = base;
      noise_std = UniformIn(rng, 6, 20);
      break;
  }
  for (double& v : *bg) v += noise_std * Gaussianish(rng);
}

// Bilinear resize of a rows x cols image to out_rows x out_cols (pixel
// centres aligned, edges clamped).
std::vector<uint8_t> Resize(const uint8_t* src, int rows, int cols, int out_rows, int out_cols) {
  std::vector<uint8_t> out(static_cast<size_t>(out_rows) * out_cols);
  for (int i = 0; i < out_rows; ++i) {
    const double sy = std::clamp((i + 0.5) * rows / out_rows - 0.5, 0.0, rows - 1.0);
    const int y0 = static_cast<int>(sy);
    const int y1 = std::min(y0 + 1, rows - 1);
    const double fy = sy - y0;
    for (int j = 0; j < out_cols; ++j) {
      const double sx = std::clamp((j + 0.5) * cols / out_cols - 0.5, 0.0, cols - 1.0);
      const int x0 = static_cast<int>(sx);
      const int x1 = std::min(x0 + 1, cols - 1);
      const double fx = sx - x0;
      const double top = src[y0 * cols + x0] * (1 - fx) + src[y0 * cols + x1] * fx;
      const double bottom = src[y1 * cols + x0] * (1 - fx) + src[y1 * cols + x1] * fx;
      out[static_cast<size_t>(i) * out_cols + j] = ClampByte(top * (1 - fy) + bottom * fy);
    }
  }
  return out;
}

struct Rect {
  int x0, y0, x1, y1;  // x1, y1 exclusive
};

double RectIoU(const Rect& a, const Rect& b) {
  const int iw = std::min(a.x1, b.x1) - std::max(a.x0, b.x0);
  const int ih = std::min(a.y1, b.y1) - std::max(a.y0, b.y0);
  if (iw <= 0 || ih <= 0) return 0.0;
  const double inter = static_cast<double>(iw) * ih;
  const double uni = static_cast<double>(a.x1 - a.x0) * (a.y1 - a.y0) + static_cast<double>(b.x1 - b.x0) * (b.y1 - b.y0) - inter;
  return inter / uni;
}

std::string SnapFileName(const Snap& s) {
  return s.file_name.empty() ? "snap_" + std::to_string(s.id) + ".png" : s.file_name;
}

// A snap fit to be written: pixels of its size, the directory's size
// (rows x cols), categories and boxes in range.
Status CheckSnap(const std::string& dir, const Snap& s, const std::vector<std::string>& categories, int rows, int cols) {
  const std::string what = "snap directory " + dir + ": snap " + std::to_string(s.id) + " (" + SnapFileName(s) + ")";
  if (s.rows <= 0 || s.cols <= 0 || s.pixels.size() != static_cast<size_t>(s.rows) * s.cols) {
    return Status::InvalidArgument(what + ": " + std::to_string(s.pixels.size()) + " pixels do not match " +
                                   std::to_string(s.cols) + "x" + std::to_string(s.rows));
  }
  if (s.rows != rows || s.cols != cols) {
    return Status::InvalidArgument(what + " is " + std::to_string(s.cols) + "x" + std::to_string(s.rows) +
                                   ", the first snap " + std::to_string(cols) + "x" + std::to_string(rows) +
                                   "; the snaps of a directory are all of one size");
  }
  for (size_t i = 0; i < s.items.size(); ++i) {
    const SnapItem& it = s.items[i];
    const SnapBox& b = it.box;
    if (it.category < 0 || it.category >= static_cast<int>(categories.size())) {
      return Status::InvalidArgument(what + ": item " + std::to_string(i) + " has category " +
                                     std::to_string(it.category) + " of " + std::to_string(categories.size()));
    }
    if (!(b.x0 >= 0 && b.y0 >= 0 && b.x1 > b.x0 && b.y1 > b.y0 && b.x1 <= s.cols && b.y1 <= s.rows)) {
      return Status::InvalidArgument(what + ": item " + std::to_string(i) + " has a box outside the image or empty");
    }
  }
  return Status::OK();
}

// ---- annotations.json -----------------------------------------------------------

// Field access with messages of the form "<file>: <where>.<field> ...".
class JsonReader {
 public:
  explicit JsonReader(std::string file) : file_(std::move(file)) {}

  Status Array(const json& obj, const std::string& where, const char* field, const json** out) const {
    auto it = obj.find(field);
    if (it == obj.end()) return Status::InvalidArgument(file_ + ": " + where + "has no \"" + field + "\" array");
    if (!it->is_array()) return Status::InvalidArgument(file_ + ": " + where + "\"" + field + "\" must be an array");
    *out = &*it;
    return Status::OK();
  }

  Status Int(const json& obj, const std::string& where, const char* field, bool required, int64_t* out) const {
    auto it = obj.find(field);
    if (it == obj.end()) {
      if (required) return Status::InvalidArgument(file_ + ": " + where + "." + field + " is missing");
      return Status::OK();
    }
    if (!it->is_number_integer()) {
      return Status::InvalidArgument(file_ + ": " + where + "." + field + " must be an integer, got " + it->dump());
    }
    *out = it->get<int64_t>();
    return Status::OK();
  }

  Status String(const json& obj, const std::string& where, const char* field, std::string* out) const {
    auto it = obj.find(field);
    if (it == obj.end()) return Status::InvalidArgument(file_ + ": " + where + "." + field + " is missing");
    if (!it->is_string()) {
      return Status::InvalidArgument(file_ + ": " + where + "." + field + " must be a string, got " + it->dump());
    }
    *out = it->get<std::string>();
    return Status::OK();
  }

  Status Error(const std::string& where, const std::string& what) const {
    return Status::InvalidArgument(file_ + ": " + where + " " + what);
  }

 private:
  std::string file_;
};

Status ParseAnnotations(const std::string& path, const json& root, std::vector<Snap>* snaps,
                        std::vector<std::string>* categories) {
  JsonReader r(path);
  if (!root.is_object()) return Status::InvalidArgument(path + ": the top level must be a JSON object");
  const json* cats = nullptr;
  const json* images = nullptr;
  const json* anns = nullptr;
  DTRAIN_RETURN_IF_ERROR(r.Array(root, "", "categories", &cats));
  DTRAIN_RETURN_IF_ERROR(r.Array(root, "", "images", &images));
  DTRAIN_RETURN_IF_ERROR(r.Array(root, "", "annotations", &anns));

  // Categories, by id; their index in memory is their rank.
  std::map<int64_t, std::string> by_id;
  for (size_t i = 0; i < cats->size(); ++i) {
    const json& c = (*cats)[i];
    const std::string where = "categories[" + std::to_string(i) + "]";
    if (!c.is_object()) return r.Error(where, "must be an object");
    int64_t id = 0;
    std::string name;
    DTRAIN_RETURN_IF_ERROR(r.Int(c, where, "id", true, &id));
    DTRAIN_RETURN_IF_ERROR(r.String(c, where, "name", &name));
    if (!by_id.emplace(id, name).second) return r.Error(where + ".id", std::to_string(id) + " is used twice");
  }
  if (by_id.empty()) return Status::InvalidArgument(path + ": \"categories\" is empty");
  std::unordered_map<int64_t, int> category_index;
  std::vector<std::string> names;
  for (const auto& [id, name] : by_id) {
    category_index[id] = static_cast<int>(names.size());
    names.push_back(name);
  }

  if (images->empty()) {
    return Status::InvalidArgument(path + ": \"images\" is empty; a snap directory holds at least one image");
  }
  std::vector<Snap> out(images->size());
  std::unordered_map<int64_t, size_t> image_index;
  std::set<std::string> files;
  for (size_t i = 0; i < images->size(); ++i) {
    const json& im = (*images)[i];
    const std::string where = "images[" + std::to_string(i) + "]";
    if (!im.is_object()) return r.Error(where, "must be an object");
    Snap& s = out[i];
    int64_t width = 0, height = 0;
    DTRAIN_RETURN_IF_ERROR(r.Int(im, where, "id", true, &s.id));
    DTRAIN_RETURN_IF_ERROR(r.String(im, where, "file_name", &s.file_name));
    DTRAIN_RETURN_IF_ERROR(r.Int(im, where, "width", true, &width));
    DTRAIN_RETURN_IF_ERROR(r.Int(im, where, "height", true, &height));
    if (width <= 0 || height <= 0 || width > (1 << 14) || height > (1 << 14)) {
      return r.Error(where, "has an unsupported size " + std::to_string(width) + "x" + std::to_string(height));
    }
    const fs::path fp(s.file_name);
    if (s.file_name.empty() || fp.is_absolute() ||
        std::any_of(fp.begin(), fp.end(), [](const fs::path& part) { return part == ".."; })) {
      return r.Error(where + ".file_name", "\"" + s.file_name + "\" must be a relative path inside the directory");
    }
    if (!files.insert(s.file_name).second) return r.Error(where + ".file_name", "\"" + s.file_name + "\" is listed twice");
    s.cols = static_cast<int>(width);
    s.rows = static_cast<int>(height);
    if (s.rows != out[0].rows || s.cols != out[0].cols) {
      return r.Error(where, "(" + s.file_name + ") is " + std::to_string(width) + "x" + std::to_string(height) +
                                " but " + out[0].file_name + " is " + std::to_string(out[0].cols) + "x" +
                                std::to_string(out[0].rows) + "; the snaps of a directory must all be of one size");
    }
    if (!image_index.emplace(s.id, i).second) return r.Error(where + ".id", std::to_string(s.id) + " is used twice");
  }

  for (size_t i = 0; i < anns->size(); ++i) {
    const json& a = (*anns)[i];
    const std::string where = "annotations[" + std::to_string(i) + "]";
    if (!a.is_object()) return r.Error(where, "must be an object");
    int64_t image_id = 0, category_id = 0, iscrowd = 0;
    DTRAIN_RETURN_IF_ERROR(r.Int(a, where, "image_id", true, &image_id));
    DTRAIN_RETURN_IF_ERROR(r.Int(a, where, "category_id", true, &category_id));
    DTRAIN_RETURN_IF_ERROR(r.Int(a, where, "iscrowd", false, &iscrowd));
    auto img = image_index.find(image_id);
    if (img == image_index.end()) {
      return r.Error(where + ".image_id", std::to_string(image_id) + " names no image of \"images\"");
    }
    auto cat = category_index.find(category_id);
    if (cat == category_index.end()) {
      return r.Error(where + ".category_id", std::to_string(category_id) + " names no category of \"categories\"");
    }
    if (iscrowd != 0) return r.Error(where + ".iscrowd", "is " + std::to_string(iscrowd) + "; crowd regions are not supported");
    auto bbox = a.find("bbox");
    if (bbox == a.end()) return r.Error(where + ".bbox", "is missing");
    if (!bbox->is_array() || bbox->size() != 4 ||
        !std::all_of(bbox->begin(), bbox->end(), [](const json& v) { return v.is_number(); })) {
      return r.Error(where + ".bbox", "must be [x, y, width, height], got " + bbox->dump());
    }
    const double x = (*bbox)[0].get<double>(), y = (*bbox)[1].get<double>();
    const double w = (*bbox)[2].get<double>(), h = (*bbox)[3].get<double>();
    Snap& s = out[img->second];
    constexpr double kSlack = 1e-3;  // tolerates rounding in files written by other tools
    if (!(std::isfinite(x) && std::isfinite(y) && std::isfinite(w) && std::isfinite(h)) || !(w > 0) || !(h > 0) ||
        x < -kSlack || y < -kSlack || x + w > s.cols + kSlack || y + h > s.rows + kSlack) {
      return r.Error(where + ".bbox", bbox->dump() + " is empty or outside its image " + s.file_name + " (" +
                                          std::to_string(s.cols) + "x" + std::to_string(s.rows) + ")");
    }
    SnapItem item;
    item.box.x0 = static_cast<float>(std::max(0.0, x));
    item.box.y0 = static_cast<float>(std::max(0.0, y));
    item.box.x1 = static_cast<float>(std::min<double>(s.cols, x + w));
    item.box.y1 = static_cast<float>(std::min<double>(s.rows, y + h));
    item.category = cat->second;
    int64_t fine = -1;
    DTRAIN_RETURN_IF_ERROR(r.Int(a, where, "fine_class", false, &fine));
    if (fine < -1 || fine >= 10) return r.Error(where + ".fine_class", std::to_string(fine) + " is not a Fashion-MNIST label (0-9)");
    item.fine_class = static_cast<int>(fine);
    DTRAIN_RETURN_IF_ERROR(r.Int(a, where, "source_index", false, &item.source_index));
    s.items.push_back(item);
  }
  *snaps = std::move(out);
  *categories = std::move(names);
  return Status::OK();
}

}  // namespace

const std::array<const char*, 4>& CoarseCategoryNames() {
  static const std::array<const char*, 4> kNames = {"tops", "bottoms", "bags", "footwear"};
  return kNames;
}

int CoarseCategory(int fine_class) {
  // 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt,
  // 7 Sneaker, 8 Bag, 9 Ankle boot.
  static const int kCoarse[10] = {0, 1, 0, 0, 0, 3, 0, 3, 2, 3};
  DTRAIN_CHECK(fine_class >= 0 && fine_class < 10);
  return kCoarse[fine_class];
}

Status SnapGenerator::Create(const Dataset& source, const SnapOptions& o, SnapGenerator* out) {
  auto bad = [](const std::string& msg) { return Status::InvalidArgument("snap options: " + msg); };
  if (o.canvas < 32 || o.canvas > 4096) return bad("canvas must be in [32, 4096], got " + std::to_string(o.canvas));
  if (o.min_items < 1) return bad("min_items must be >= 1, got " + std::to_string(o.min_items));
  if (o.min_items > o.max_items) {
    return bad("min_items (" + std::to_string(o.min_items) + ") must not exceed max_items (" +
               std::to_string(o.max_items) + ")");
  }
  if (o.max_items > kMaxItemsLimit) {
    return bad("max_items must be <= " + std::to_string(kMaxItemsLimit) + ", got " + std::to_string(o.max_items));
  }
  if (!std::isfinite(o.min_scale) || !(o.min_scale > 0)) return bad("min_scale must be > 0, got " + std::to_string(o.min_scale));
  if (!std::isfinite(o.max_scale) || o.min_scale > o.max_scale) {
    return bad("max_scale (" + std::to_string(o.max_scale) + ") must be >= min_scale (" + std::to_string(o.min_scale) + ")");
  }
  if (!(o.max_overlap >= 0.0f && o.max_overlap <= 1.0f)) {
    return bad("max_overlap must be in [0, 1], got " + std::to_string(o.max_overlap));
  }
  if (source.size <= 0 || source.rows <= 0 || source.cols <= 0 ||
      source.images.size() != static_cast<size_t>(source.size) * source.rows * source.cols ||
      source.labels.size() != static_cast<size_t>(source.size)) {
    return Status::InvalidArgument("snap generator: the source dataset " + source.source + " is empty or inconsistent");
  }
  const long largest = std::lround(std::max(source.rows, source.cols) * static_cast<double>(o.max_scale));
  if (largest > o.canvas) {
    return bad("max_scale " + std::to_string(o.max_scale) + " makes a " + std::to_string(largest) +
               " px item, larger than the canvas of " + std::to_string(o.canvas) + " px");
  }
  if (std::lround(std::min(source.rows, source.cols) * static_cast<double>(o.min_scale)) < 1) {
    return bad("min_scale " + std::to_string(o.min_scale) + " shrinks an item to nothing");
  }
  for (int64_t i = 0; i < source.size; ++i) {
    if (source.labels[static_cast<size_t>(i)] >= 10) {
      return Status::InvalidArgument("snap generator: " + source.source + ": label " +
                                     std::to_string(source.labels[static_cast<size_t>(i)]) + " of image " +
                                     std::to_string(i) + " is not a Fashion-MNIST label (0-9)");
    }
  }
  out->source_ = &source;
  out->options_ = o;
  return Status::OK();
}

Snap SnapGenerator::Generate(int64_t key) const {
  DTRAIN_CHECK(source_ != nullptr);
  const SnapOptions& o = options_;
  const Dataset& ds = *source_;
  const int canvas = o.canvas;
  Rng rng(Rng::Mix(o.seed, static_cast<uint64_t>(key)));

  Snap snap;
  snap.id = key;
  snap.rows = canvas;
  snap.cols = canvas;
  const int wanted = o.min_items + static_cast<int>(rng.Uniform(static_cast<uint64_t>(o.max_items - o.min_items + 1)));

  std::vector<double> bg;
  DrawBackground(canvas, &rng, &bg);
  snap.pixels.resize(bg.size());
  for (size_t i = 0; i < bg.size(); ++i) snap.pixels[i] = ClampByte(bg[i]);

  // owner[p]: the item whose pixel p shows, -1 for background.
  std::vector<int8_t> owner(bg.size(), -1);
  std::vector<Rect> squares;
  std::vector<int64_t> mask_pixels;  // per item
  std::vector<int64_t> visible;      // per item: mask pixels not hidden by later items
  std::vector<int64_t> hidden;       // scratch, per item

  for (int k = 0; k < wanted; ++k) {
    bool placed = false;
    for (int draw = 0; draw < kDrawsPerItem && !placed; ++draw) {
      const int64_t index = static_cast<int64_t>(rng.Uniform(static_cast<uint64_t>(ds.size)));
      const double scale = UniformIn(&rng, o.min_scale, o.max_scale);
      const double brightness = UniformIn(&rng, 0.7, 1.3);
      const int h = std::clamp(static_cast<int>(std::lround(ds.rows * scale)), 1, canvas);
      const int w = std::clamp(static_cast<int>(std::lround(ds.cols * scale)), 1, canvas);
      const std::vector<uint8_t> item = Resize(ds.image(index), ds.rows, ds.cols, h, w);
      const int64_t count = std::count_if(item.begin(), item.end(), [](uint8_t v) { return v > kItemThreshold; });
      if (count == 0) continue;  // a blank source image
      for (int attempt = 0; attempt < kPositionsPerDraw && !placed; ++attempt) {
        const int x = static_cast<int>(rng.Uniform(static_cast<uint64_t>(canvas - w + 1)));
        const int y = static_cast<int>(rng.Uniform(static_cast<uint64_t>(canvas - h + 1)));
        const Rect sq{x, y, x + w, y + h};
        bool ok = true;
        for (const Rect& other : squares) ok = ok && RectIoU(sq, other) <= o.max_overlap;
        if (!ok) continue;
        // The pixels of earlier items this one would hide.
        hidden.assign(squares.size(), 0);
        for (int i = 0; i < h; ++i) {
          for (int j = 0; j < w; ++j) {
            if (item[static_cast<size_t>(i) * w + j] <= kItemThreshold) continue;
            const int8_t who = owner[static_cast<size_t>(y + i) * canvas + x + j];
            if (who >= 0) ++hidden[static_cast<size_t>(who)];
          }
        }
        for (size_t e = 0; e < squares.size() && ok; ++e) {
          ok = static_cast<double>(visible[e] - hidden[e]) >= kMinVisibleShare * static_cast<double>(mask_pixels[e]);
        }
        if (!ok) continue;
        const int8_t me = static_cast<int8_t>(squares.size());
        for (int i = 0; i < h; ++i) {
          for (int j = 0; j < w; ++j) {
            const uint8_t v = item[static_cast<size_t>(i) * w + j];
            if (v <= kItemThreshold) continue;
            const size_t p = static_cast<size_t>(y + i) * canvas + x + j;
            owner[p] = me;
            snap.pixels[p] = ClampByte(v * brightness);
          }
        }
        for (size_t e = 0; e < squares.size(); ++e) visible[e] -= hidden[e];
        squares.push_back(sq);
        mask_pixels.push_back(count);
        visible.push_back(count);
        SnapItem it;
        it.fine_class = ds.labels[static_cast<size_t>(index)];
        it.category = CoarseCategory(it.fine_class);
        it.source_index = index;
        snap.items.push_back(it);
        placed = true;
      }
    }
    if (!placed) break;  // the canvas is full enough: fewer items
  }

  // Each box: the tight box of the item's visible pixels.
  std::vector<Rect> bounds(snap.items.size(), Rect{canvas, canvas, 0, 0});
  for (int y = 0; y < canvas; ++y) {
    for (int x = 0; x < canvas; ++x) {
      const int8_t who = owner[static_cast<size_t>(y) * canvas + x];
      if (who < 0) continue;
      Rect& b = bounds[static_cast<size_t>(who)];
      b.x0 = std::min(b.x0, x);
      b.y0 = std::min(b.y0, y);
      b.x1 = std::max(b.x1, x + 1);
      b.y1 = std::max(b.y1, y + 1);
    }
  }
  for (size_t i = 0; i < snap.items.size(); ++i) {
    SnapBox& box = snap.items[i].box;
    box.x0 = static_cast<float>(bounds[i].x0);
    box.y0 = static_cast<float>(bounds[i].y0);
    box.x1 = static_cast<float>(bounds[i].x1);
    box.y1 = static_cast<float>(bounds[i].y1);
  }
  return snap;
}

Status SnapDirectoryWriter::Open(const std::string& dir, const std::vector<std::string>& categories,
                                 SnapDirectoryWriter* out) {
  if (categories.empty()) return Status::InvalidArgument("snap directory " + dir + ": no categories");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Status::IOError("cannot create the snap directory " + dir + ": " + ec.message());
  const fs::path ann = fs::path(dir) / kAnnotationsFile;
  fs::remove(ann, ec);
  if (ec) return Status::IOError("cannot remove the old " + ann.string() + ": " + ec.message());
  *out = SnapDirectoryWriter();
  out->dir_ = dir;
  out->categories_ = categories;
  return Status::OK();
}

Status SnapDirectoryWriter::Add(const Snap& s) {
  const std::string name = SnapFileName(s);
  const ImageRecord* first = images_.empty() ? nullptr : &images_.front();
  DTRAIN_RETURN_IF_ERROR(CheckSnap(dir_, s, categories_, first ? first->rows : s.rows, first ? first->cols : s.cols));
  if (ids_.count(s.id) != 0) return Status::InvalidArgument("snap directory " + dir_ + ": snap id " + std::to_string(s.id) + " is used twice");
  if (file_names_.count(name) != 0) return Status::InvalidArgument("snap directory " + dir_ + ": file name " + name + " is used twice");
  GrayImage img;
  img.rows = s.rows;
  img.cols = s.cols;
  img.pixels = s.pixels;
  DTRAIN_RETURN_IF_ERROR(WriteGrayPng((fs::path(dir_) / name).string(), img));
  ids_.insert(s.id);
  file_names_.insert(name);
  images_.push_back(ImageRecord{s.id, name, s.rows, s.cols});
  for (const SnapItem& it : s.items) annotations_.push_back(AnnotationRecord{s.id, it});
  return Status::OK();
}

Status SnapDirectoryWriter::Finish() {
  if (images_.empty()) return Status::FailedPrecondition("snap directory " + dir_ + ": no snaps were written");
  // One record a line, fields in COCO's order.
  using ordered = nlohmann::ordered_json;
  std::string text = "{\"info\": {\"description\": \"dtrain street snaps\"},\n\"images\": [";
  for (size_t i = 0; i < images_.size(); ++i) {
    const ImageRecord& r = images_[i];
    const ordered im = {{"id", r.id}, {"file_name", r.file_name}, {"width", r.cols}, {"height", r.rows}};
    text += (i ? ",\n " : "\n ") + im.dump();
  }
  text += "\n],\n\"annotations\": [";
  for (size_t i = 0; i < annotations_.size(); ++i) {
    const SnapItem& it = annotations_[i].item;
    const SnapBox& b = it.box;
    ordered a = {{"id", static_cast<int64_t>(i) + 1},
                 {"image_id", annotations_[i].image_id},
                 {"category_id", it.category + 1},
                 {"bbox", {b.x0, b.y0, b.width(), b.height()}},
                 {"area", static_cast<double>(b.width()) * b.height()},
                 {"iscrowd", 0}};
    if (it.fine_class >= 0) a["fine_class"] = it.fine_class;
    if (it.source_index >= 0) a["source_index"] = it.source_index;
    text += (i ? ",\n " : "\n ") + a.dump();
  }
  text += "\n],\n\"categories\": [";
  for (size_t c = 0; c < categories_.size(); ++c) {
    const ordered cat = {{"id", c + 1}, {"name", categories_[c]}};
    text += (c ? ",\n " : "\n ") + cat.dump();
  }
  text += "\n]}\n";
  return WriteFileAtomically((fs::path(dir_) / kAnnotationsFile).string(), text);
}

Status WriteSnapDirectory(const std::string& dir, const std::vector<Snap>& snaps,
                          const std::vector<std::string>& categories) {
  auto bad = [&](const std::string& msg) { return Status::InvalidArgument("snap directory " + dir + ": " + msg); };
  if (snaps.empty()) return bad("no snaps to write");
  if (categories.empty()) return bad("no categories");
  // Everything is checked before anything is written.
  std::set<int64_t> ids;
  std::set<std::string> names;
  for (const Snap& s : snaps) {
    DTRAIN_RETURN_IF_ERROR(CheckSnap(dir, s, categories, snaps[0].rows, snaps[0].cols));
    if (!ids.insert(s.id).second) return bad("snap id " + std::to_string(s.id) + " is used twice");
    if (!names.insert(SnapFileName(s)).second) return bad("file name " + SnapFileName(s) + " is used twice");
  }
  SnapDirectoryWriter writer;
  DTRAIN_RETURN_IF_ERROR(SnapDirectoryWriter::Open(dir, categories, &writer));
  for (const Snap& s : snaps) DTRAIN_RETURN_IF_ERROR(writer.Add(s));
  return writer.Finish();
}

Status ReadSnapDirectory(const std::string& dir, bool load_pixels, std::vector<Snap>* snaps,
                         std::vector<std::string>* categories) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return Status::NotFound("snap directory " + dir + " does not exist");
  const std::string path = (fs::path(dir) / kAnnotationsFile).string();
  if (!fs::is_regular_file(path, ec)) {
    if (fs::directory_iterator(dir, ec) == fs::directory_iterator()) {
      return Status::InvalidArgument("snap directory " + dir +
                                     " is empty: it needs PNG images and a COCO annotations.json");
    }
    return Status::NotFound(path + " does not exist; a snap directory holds PNG images and a COCO annotations.json "
                                   "(`dtrain data snaps` writes one)");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError("cannot open " + path);
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return Status::IOError("cannot read " + path);
  json root;
  try {
    root = json::parse(text.str());
  } catch (const json::exception& e) {
    return Status::Corruption(path + ": not valid JSON: " + e.what());
  }
  std::vector<Snap> out;
  std::vector<std::string> names;
  try {
    DTRAIN_RETURN_IF_ERROR(ParseAnnotations(path, root, &out, &names));
  } catch (const json::exception& e) {  // a value of an unexpected type that slipped past the checks
    return Status::InvalidArgument(path + ": " + e.what());
  }
  if (load_pixels) {
    for (Snap& s : out) {
      const std::string file = (fs::path(dir) / s.file_name).string();
      GrayImage img;
      DTRAIN_RETURN_IF_ERROR(ReadGrayImage(file, &img));
      if (img.rows != s.rows || img.cols != s.cols) {
        return Status::InvalidArgument(file + ": the image is " + std::to_string(img.cols) + "x" +
                                       std::to_string(img.rows) + " but " + kAnnotationsFile + " says " +
                                       std::to_string(s.cols) + "x" + std::to_string(s.rows));
      }
      s.pixels = std::move(img.pixels);
    }
  }
  *snaps = std::move(out);
  *categories = std::move(names);
  return Status::OK();
}

}  // namespace dtrain::data
