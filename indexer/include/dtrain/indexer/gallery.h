// Galleries: the images an index is built over (and query sets for
// evaluation). A gallery is named by a spec:
//   "fashion_mnist:train", "fashion_mnist:test"  a split of Fashion-MNIST
//                                                (ids = dataset indices);
//   a directory                                  every .png/.pgm under it,
//                                                recursively, in path order;
//                                                an image in a sub-directory
//                                                is labelled by that
//                                                sub-directory (a catalogue
//                                                sorted by category).
//
// Thread-safety: the functions share no state.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/data/fashion_mnist.h"
#include "dtrain/indexer.pb.h"

namespace dtrain::indexer {

struct GalleryOptions {
  std::string spec = "fashion_mnist:train";
  // Keep only the first N images (0 = all).
  int64_t limit = 0;
  // Where the Fashion-MNIST files are.
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
};

struct Gallery {
  // The pixels (every image has the same size). images.labels holds the label
  // for labelled items and 0 for the others; items[i].label is authoritative.
  data::Dataset images;
  // One per image: id, label, source.
  std::vector<ItemMeta> items;
  std::vector<std::string> label_names;
  // "fashion_mnist:train (60000 images, 28x28)".
  std::string description;
  // True when the spec names a Fashion-MNIST split.
  bool is_dataset = false;
};

// Loads a gallery. Errors, each naming the spec or the file:
// InvalidArgument for an unknown split, a spec that is neither a split nor a
// directory, images of different sizes, or a bad image (colour, 16-bit, not
// an image); NotFound for a missing directory or dataset; FailedPrecondition
// for a gallery with no images. *out is set only on success.
Status LoadGallery(const GalleryOptions& options, Gallery* out);

// True when `spec` names a Fashion-MNIST split; *split is set then.
bool ParseDatasetSpec(const std::string& spec, data::Split* split);

// The stable id of a directory gallery's image: the 64-bit FNV-1a hash of its
// relative path (with '/' separators), top bit cleared so ids are >= 0.
int64_t PathId(const std::string& relative_path);

}  // namespace dtrain::indexer
