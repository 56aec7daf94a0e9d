#include "dtrain/indexer/gallery.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <unordered_set>

#include "dtrain/data/image_io.h"

namespace dtrain::indexer {
namespace fs = std::filesystem;

bool ParseDatasetSpec(const std::string& spec, data::Split* split) {
  if (spec == "fashion_mnist:train" || spec == "train") {
    *split = data::Split::kTrain;
    return true;
  }
  if (spec == "fashion_mnist:test" || spec == "test") {
    *split = data::Split::kTest;
    return true;
  }
  return false;
}

int64_t PathId(const std::string& relative_path) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : relative_path) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return static_cast<int64_t>(h & 0x7fffffffffffffffULL);
}

namespace {

std::string SizeText(int rows, int cols) { return std::to_string(rows) + "x" + std::to_string(cols); }

Status LoadDatasetGallery(const GalleryOptions& o, data::Split split, Gallery* g) {
  data::FashionMnistOptions fo;
  fo.dir = o.data_dir;
  fo.split = split;
  fo.limit = o.limit;
  DTRAIN_RETURN_IF_ERROR(data::LoadFashionMnist(fo, &g->images));
  const std::string source = std::string("fashion_mnist:") + data::SplitName(split);
  for (const char* n : data::ClassNames()) g->label_names.emplace_back(n);
  g->items.resize(static_cast<size_t>(g->images.size));
  for (int64_t i = 0; i < g->images.size; ++i) {
    ItemMeta& m = g->items[static_cast<size_t>(i)];
    m.set_id(i);
    m.set_label(g->images.labels[static_cast<size_t>(i)]);
    m.set_label_name(g->label_names[g->images.labels[static_cast<size_t>(i)]]);
    m.set_source(source);
    m.set_dataset_index(i);
  }
  g->description = source + " (" + std::to_string(g->images.size) + " images, " +
                   SizeText(g->images.rows, g->images.cols) + ")";
  g->is_dataset = true;
  return Status::OK();
}

Status LoadDirectoryGallery(const GalleryOptions& o, Gallery* g) {
  const fs::path root(o.spec);
  std::error_code ec;
  std::vector<std::string> rel_paths;
  int64_t skipped = 0;
  for (fs::recursive_directory_iterator it(root, fs::directory_options::skip_permission_denied, ec), end;
       !ec && it != end; it.increment(ec)) {
    if (!it->is_regular_file(ec)) continue;
    const std::string rel = fs::relative(it->path(), root, ec).generic_string();
    if (data::IsImageFileName(rel)) {
      rel_paths.push_back(rel);
    } else {
      ++skipped;
    }
  }
  if (ec) return Status::IOError("cannot list the gallery directory " + o.spec + ": " + ec.message());
  std::sort(rel_paths.begin(), rel_paths.end());
  if (o.limit > 0 && static_cast<int64_t>(rel_paths.size()) > o.limit) rel_paths.resize(static_cast<size_t>(o.limit));
  if (rel_paths.empty()) {
    return Status::FailedPrecondition("the gallery directory " + o.spec + " holds no .png or .pgm images" +
                                      (skipped ? " (" + std::to_string(skipped) + " other files)" : ""));
  }
  // Labels: the first path component of images in sub-directories.
  std::map<std::string, int> label_of;
  for (const std::string& r : rel_paths) {
    const size_t slash = r.find('/');
    if (slash != std::string::npos) label_of.emplace(r.substr(0, slash), 0);
  }
  int next = 0;
  for (auto& [name, label] : label_of) {
    label = next++;
    g->label_names.push_back(name);
  }
  data::Dataset& d = g->images;
  d.num_classes = std::max<int>(1, static_cast<int>(label_of.size()));
  d.source = o.spec;
  std::unordered_set<int64_t> ids;
  std::string first_path;
  for (const std::string& r : rel_paths) {
    data::GrayImage img;
    DTRAIN_RETURN_IF_ERROR(data::ReadGrayImage((root / r).string(), &img));
    if (d.size == 0) {
      d.rows = img.rows;
      d.cols = img.cols;
      first_path = r;
    } else if (img.rows != d.rows || img.cols != d.cols) {
      return Status::InvalidArgument("gallery " + o.spec + ": " + r + " is " + SizeText(img.rows, img.cols) +
                                     " but " + first_path + " is " + SizeText(d.rows, d.cols) +
                                     "; every image of a gallery must have the same size");
    }
    ItemMeta m;
    m.set_id(PathId(r));
    if (!ids.insert(m.id()).second) {
      return Status::Internal("gallery " + o.spec + ": two paths hash to the id of " + r);
    }
    const size_t slash = r.find('/');
    if (slash != std::string::npos) {
      m.set_label(label_of[r.substr(0, slash)]);
      m.set_label_name(r.substr(0, slash));
    }
    m.set_source(r);
    d.images.insert(d.images.end(), img.pixels.begin(), img.pixels.end());
    d.labels.push_back(static_cast<uint8_t>(std::max(0, m.label()) & 0xff));
    g->items.push_back(std::move(m));
    ++d.size;
  }
  g->description = o.spec + " (" + std::to_string(d.size) + " images, " + SizeText(d.rows, d.cols) +
                   (label_of.empty() ? "" : ", " + std::to_string(label_of.size()) + " labelled sub-directories") + ")";
  return Status::OK();
}

}  // namespace

Status LoadGallery(const GalleryOptions& options, Gallery* out) {
  if (options.limit < 0) return Status::InvalidArgument("gallery limit must be >= 0");
  Gallery g;
  data::Split split;
  if (ParseDatasetSpec(options.spec, &split)) {
    DTRAIN_RETURN_IF_ERROR(LoadDatasetGallery(options, split, &g));
  } else if (options.spec.rfind("fashion_mnist:", 0) == 0) {
    return Status::InvalidArgument("gallery '" + options.spec +
                                   "': unknown split (use fashion_mnist:train or fashion_mnist:test)");
  } else {
    std::error_code ec;
    if (!fs::exists(options.spec, ec)) {
      return Status::NotFound("gallery '" + options.spec +
                              "' is neither fashion_mnist:train, fashion_mnist:test nor an existing directory");
    }
    if (!fs::is_directory(options.spec, ec)) {
      return Status::InvalidArgument("gallery '" + options.spec + "' is a file; give the directory of images");
    }
    DTRAIN_RETURN_IF_ERROR(LoadDirectoryGallery(options, &g));
  }
  if (g.images.size == 0) return Status::FailedPrecondition("gallery " + options.spec + " is empty");
  *out = std::move(g);
  return Status::OK();
}

}  // namespace dtrain::indexer
