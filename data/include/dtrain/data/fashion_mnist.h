// Fashion-MNIST: reading the IDX files into memory.
//
// The whole split is held in memory as raw bytes (60000 x 28 x 28 = 45 MiB for
// train); conversion to float happens per batch in transforms.h.
//
// Thread-safety: the functions here share no state and may be called from any
// thread; a loaded Dataset is immutable by convention and may be read from
// many threads at once.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "dtrain/common/status.h"

namespace dtrain::data {

enum class Split { kTrain, kTest };

// "train" or "test".
const char* SplitName(Split split);

// The ten Fashion-MNIST class names, indexed by label:
// 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt,
// 7 Sneaker, 8 Bag, 9 Ankle boot.
const std::array<const char*, 10>& ClassNames();

// A labelled image set held in memory.
struct Dataset {
  int64_t size = 0;             // number of images (== labels.size())
  int rows = 0;                 // image height in pixels
  int cols = 0;                 // image width in pixels
  std::vector<uint8_t> images;  // size * rows * cols bytes, image-major, each image row-major
  std::vector<uint8_t> labels;  // size labels, each in [0, num_classes)
  int num_classes = 10;
  std::string source;           // "<images file>, <labels file>", for messages

  // The rows*cols pixels of image i. Precondition: 0 <= i < size.
  const uint8_t* image(int64_t i) const { return images.data() + i * rows * cols; }
};

struct FashionMnistOptions {
  // Directory holding the four IDX files.
  // Default: where Debian's dataset-fashion-mnist package installs them.
  std::string dir = "/usr/share/datasets/fashion-mnist";
  // Default: the 60000-image training split.
  Split split = Split::kTrain;
  // 0 (the default) keeps the whole split; N > 0 keeps the first N images
  // (all of them when N exceeds the split). Negative is an error.
  int64_t limit = 0;
  // Non-empty: keep only the images of these labels (0-9), in file order,
  // before `limit` applies. A label outside 0-9 is an error.
  std::vector<int> classes;
};

// Loads one split from `options.dir`. Files are looked for as
// "<prefix>-images-idx3-ubyte.gz" and "<prefix>-labels-idx1-ubyte.gz"
// (prefix "train" or "t10k"), falling back to the names without ".gz" when
// the compressed file is absent.
//
// Errors: NotFound when a file is missing (the message names the paths tried
// and how to get them); Corruption when a file fails the IDX checks (see
// ReadIdxImages), the image and label counts differ, or a label is >= 10;
// InvalidArgument for a negative limit. On error *out is left unchanged.
Status LoadFashionMnist(const FashionMnistOptions& options, Dataset* out);

// Reads an IDX file of unsigned-byte images (magic 0x00000803: count, rows,
// cols as big-endian uint32, then count*rows*cols pixel bytes). gzip
// compressed and plain files are both accepted (zlib reads plain files
// transparently).
//
// Checks: the magic number; 1 <= rows, cols <= 4096; the file holds exactly
// the pixel bytes its header promises (fewer: "truncated", more: "trailing
// bytes"). Every message starts with the path. Errors: NotFound (no such
// file), IOError (cannot open or read), Corruption (any failed check).
// On error the outputs are left unchanged.
Status ReadIdxImages(const std::string& path, std::vector<uint8_t>* pixels, int64_t* count,
                     int* rows, int* cols);

// Reads an IDX file of unsigned-byte labels (magic 0x00000801: count as
// big-endian uint32, then count bytes). Same checks and errors as
// ReadIdxImages; label values are not range-checked here.
Status ReadIdxLabels(const std::string& path, std::vector<uint8_t>* labels, int64_t* count);

struct DatasetSummary {
  int64_t size = 0;
  int rows = 0;
  int cols = 0;
  std::array<int64_t, 10> per_class{};  // images per label; labels >= 10 are not counted
  // Mean and population standard deviation of pixel/255 over every pixel of
  // every image (computed exactly from a 256-bin histogram).
  double pixel_mean = 0.0;
  double pixel_std = 0.0;
};

DatasetSummary Summarize(const Dataset& dataset);

}  // namespace dtrain::data
