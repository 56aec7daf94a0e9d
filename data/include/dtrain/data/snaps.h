// Synthetic street snaps: Fashion-MNIST items composed on a canvas, with
// their boxes, for training and evaluating the detector (models/detector.h)
// and the snap index (indexer/snap_index.h).
//
// A snap holds 2-6 items (by default) on a square grayscale canvas, each a
// Fashion-MNIST image resized by a random scale, placed at a random position
// (the placed squares overlap by at most max_overlap IoU), its brightness
// jittered, over a textured or noisy background. Each item records:
//   box          the tight box of the item's visible pixels on the canvas
//                (pixel coordinates, x1/y1 exclusive), so a detector is asked
//                for what it can see;
//   fine_class   the Fashion-MNIST label (0-9);
//   category     the coarse category (CoarseCategory below);
//   source_index the image's index in its split.
// Training snaps draw items only from the train split, evaluation snaps only
// from the test split: the caller passes the split's Dataset.
//
// Determinism: Generate(key) depends only on the options (seed included), the
// dataset and `key`; the same key gives the same snap on every machine.
//
// COCO format (so users can bring real snaps): one annotations.json per
// directory with "images" (id, file_name, width, height), "annotations" (id,
// image_id, category_id, bbox [x, y, w, h], area, iscrowd 0, plus dtrain's
// "fine_class" and "source_index" when known) and "categories" (id, name).
// Category ids are 1-based in the file (COCO convention) and 0-based in
// memory.
//
// Thread-safety: a SnapGenerator is immutable after construction; Generate()
// may be called from many threads at once.
#pragma once

#include <array>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/data/fashion_mnist.h"

namespace dtrain::data {

// The four coarse categories, in this order: tops, bottoms, bags, footwear.
const std::array<const char*, 4>& CoarseCategoryNames();
// Fashion-MNIST label -> coarse category index: tops (T-shirt/top, Pullover,
// Coat, Shirt, Dress), bottoms (Trouser), bags (Bag), footwear (Sandal,
// Sneaker, Ankle boot). Precondition: 0 <= fine_class < 10.
int CoarseCategory(int fine_class);

// An axis-aligned box in pixel coordinates; x1 and y1 are exclusive.
struct SnapBox {
  float x0 = 0, y0 = 0, x1 = 0, y1 = 0;
  float width() const { return x1 - x0; }
  float height() const { return y1 - y0; }
};

struct SnapItem {
  SnapBox box;
  int category = 0;           // index into the category list
  int fine_class = -1;        // Fashion-MNIST label; -1 when unknown (user data)
  int64_t source_index = -1;  // index in the source split; -1 when unknown
};

struct Snap {
  int64_t id = 0;               // the generator key, or the COCO image id
  std::string file_name;        // set for snaps read from / written to disk
  int rows = 0;
  int cols = 0;
  std::vector<uint8_t> pixels;  // rows * cols, row-major
  std::vector<SnapItem> items;
};

struct SnapOptions {
  int canvas = 128;
  int min_items = 2;
  int max_items = 6;
  float min_scale = 0.6f;
  float max_scale = 1.6f;
  // Largest IoU between two items' placed squares.
  float max_overlap = 0.2f;
  uint64_t seed = 1;
};

class SnapGenerator {
 public:
  // `source` must outlive the generator. InvalidArgument for options out of
  // range (canvas < 32, min_items < 1, min_items > max_items, scales <= 0 or
  // min > max, a scaled item larger than the canvas, overlap outside [0, 1])
  // or an empty dataset, naming the option. Also refused: canvas > 4096,
  // max_items > 64, a label outside 0-9.
  //
  // Placement: each item gets a bounded number of tries (new positions, then
  // a new image and scale); one that finds no place within max_overlap, or
  // that would leave an earlier item less than 60% of its pixels visible, is
  // left out, so a crowded snap may hold fewer than min_items (never none
  // for images that are not blank).
  static Status Create(const Dataset& source, const SnapOptions& options, SnapGenerator* out);

  SnapGenerator() = default;
  // The snap for `key` (its id is `key`).
  Snap Generate(int64_t key) const;
  const SnapOptions& options() const { return options_; }

 private:
  const Dataset* source_ = nullptr;
  SnapOptions options_;
};

// Writes `snaps` into `dir` (created if missing) as <file_name or
// snap_<id>.png> plus annotations.json with `categories`. The annotations are
// written last, atomically: a directory without annotations.json is not a
// snap directory.
Status WriteSnapDirectory(const std::string& dir, const std::vector<Snap>& snaps,
                          const std::vector<std::string>& categories);

// WriteSnapDirectory one snap at a time, for more snaps than should be held
// in memory at once (`dtrain data snaps --count 20000`):
//   1. Open() creates `dir` and removes an older annotations.json (it would
//      describe images about to be replaced);
//   2. Add() checks a snap (as WriteSnapDirectory does: a unique id and file
//      name, the first snap's size, categories and boxes in range) and writes
//      its PNG;
//   3. Finish() writes annotations.json atomically. Until then the directory
//      is not a snap directory; a writer destroyed without Finish() leaves it
//      so.
// Not thread-safe: one thread drives a writer.
class SnapDirectoryWriter {
 public:
  // InvalidArgument without categories; IOError when `dir` cannot be made.
  static Status Open(const std::string& dir, const std::vector<std::string>& categories, SnapDirectoryWriter* out);

  Status Add(const Snap& snap);
  // FailedPrecondition without snaps.
  Status Finish();
  int64_t snaps() const { return static_cast<int64_t>(images_.size()); }

 private:
  struct ImageRecord {
    int64_t id;
    std::string file_name;
    int rows, cols;
  };
  struct AnnotationRecord {
    int64_t image_id;
    SnapItem item;
  };
  std::string dir_;
  std::vector<std::string> categories_;
  std::vector<ImageRecord> images_;
  std::vector<AnnotationRecord> annotations_;
  std::set<int64_t> ids_;
  std::set<std::string> file_names_;
};

// Reads annotations.json of `dir` and, when `load_pixels`, every image it
// names (8-bit grayscale PNG or PGM, all of one size). Errors, each naming
// the file and the field: NotFound for a missing directory, annotations.json
// or image; InvalidArgument for an empty directory (no images), an image of
// another size or depth, an annotation naming an unknown image or category,
// a box outside its image; Corruption for JSON that does not parse. The
// categories of the file are returned in `categories` (by id order).
Status ReadSnapDirectory(const std::string& dir, bool load_pixels, std::vector<Snap>* snaps,
                         std::vector<std::string>* categories);

}  // namespace dtrain::data
