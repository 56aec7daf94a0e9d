#include "dtrain/data/fashion_mnist.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <utility>

namespace dtrain::data {
namespace {

constexpr uint32_t kImagesMagic = 0x00000803;  // unsigned byte, 3 dimensions
constexpr uint32_t kLabelsMagic = 0x00000801;  // unsigned byte, 1 dimension
constexpr uint32_t kMaxSide = 4096;
// Pixels are read in slices of this many bytes so that a header promising far
// more than the file holds does not allocate it all up front.
constexpr int64_t kReadSlice = int64_t{64} << 20;

std::string Hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", static_cast<unsigned>(v));
  return buf;
}

uint32_t BigEndian32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

// Owns a gzFile. Reads gzip and plain files alike.
class GzReader {
 public:
  GzReader() = default;
  GzReader(const GzReader&) = delete;
  GzReader& operator=(const GzReader&) = delete;
  ~GzReader() {
    if (file_ != nullptr) gzclose(file_);
  }

  Status Open(const std::string& path) {
    path_ = path;
    // zlib does not tell a missing file from other failures; ask the OS first.
    std::FILE* probe = std::fopen(path.c_str(), "rb");
    if (probe == nullptr) {
      const int err = errno;
      if (err == ENOENT) return Status::NotFound(path + ": no such file");
      return Status::IOError(path + ": cannot open: " + std::strerror(err));
    }
    std::fclose(probe);
    file_ = gzopen(path.c_str(), "rb");
    if (file_ == nullptr) return Status::IOError(path + ": gzopen failed: " + std::strerror(errno));
    gzbuffer(file_, 1 << 17);
    return Status::OK();
  }

  // Reads up to n bytes into buf; *got < n only at the end of the data.
  Status Read(uint8_t* buf, int64_t n, int64_t* got) {
    *got = 0;
    while (*got < n) {
      const unsigned want = static_cast<unsigned>(std::min<int64_t>(n - *got, int64_t{1} << 30));
      const int r = gzread(file_, buf + *got, want);
      if (r < 0) {
        int errnum = 0;
        const char* msg = gzerror(file_, &errnum);
        if (errnum == Z_ERRNO) return Status::IOError(path_ + ": read failed: " + std::strerror(errno));
        return Status::Corruption(path_ + ": gzip data error: " + msg);
      }
      if (r == 0) break;
      *got += r;
    }
    return Status::OK();
  }

  // Reads and counts whatever is left.
  Status CountRemaining(int64_t* remaining) {
    *remaining = 0;
    uint8_t buf[1 << 14];
    for (;;) {
      int64_t got = 0;
      DTRAIN_RETURN_IF_ERROR(Read(buf, sizeof(buf), &got));
      *remaining += got;
      if (got < static_cast<int64_t>(sizeof(buf))) return Status::OK();
    }
  }

  // After a short read: " (the gzip stream itself ends early)" when zlib saw
  // a cut-off compressed stream, else "".
  std::string ShortReadNote() {
    int errnum = 0;
    gzerror(file_, &errnum);
    return errnum == Z_BUF_ERROR ? " (the gzip stream itself ends early)" : "";
  }

 private:
  std::string path_;
  gzFile file_ = nullptr;
};

// What one IDX unsigned-byte file must look like.
struct IdxKind {
  uint32_t magic;
  int ndims;
  const char* description;   // "IDX unsigned-byte 3-D images"
  uint32_t sibling_magic;    // the magic of the file it is most often confused with
  const char* sibling_hint;  // "is this a label file?"
};

constexpr IdxKind kImagesKind{kImagesMagic, 3, "IDX unsigned-byte 3-D images", kLabelsMagic,
                              "is this a label file?"};
constexpr IdxKind kLabelsKind{kLabelsMagic, 1, "IDX unsigned-byte 1-D labels", kImagesMagic,
                              "is this an image file?"};

std::string MagicHint(uint32_t magic, const IdxKind& kind) {
  if (magic == kind.sibling_magic) return std::string("; ") + kind.sibling_hint;
  if ((magic >> 16) != 0) return "; this is not an IDX file";
  if (((magic >> 8) & 0xff) != 0x08) return "; its element type is not unsigned byte";
  return "; it has " + std::to_string(magic & 0xff) + " dimensions";
}

// Reads header and payload of an IDX unsigned-byte file. dims receives the
// kind.ndims dimension sizes; payload receives exactly their product in bytes.
Status ReadIdxFile(const std::string& path, const IdxKind& kind, uint32_t dims[3],
                   std::vector<uint8_t>* payload) {
  GzReader reader;
  DTRAIN_RETURN_IF_ERROR(reader.Open(path));

  const int64_t header_bytes = 4 + 4 * kind.ndims;
  uint8_t header[16] = {};
  int64_t got = 0;
  DTRAIN_RETURN_IF_ERROR(reader.Read(header, header_bytes, &got));
  if (got < 4) {
    return Status::Corruption(path + ": truncated: the file ends after " + std::to_string(got) +
                              " bytes, before the 4-byte IDX magic number" + reader.ShortReadNote());
  }
  const uint32_t magic = BigEndian32(header);
  if (magic != kind.magic) {
    return Status::Corruption(path + ": wrong magic number " + Hex32(magic) + ", expected " +
                              Hex32(kind.magic) + " (" + kind.description + ")" +
                              MagicHint(magic, kind));
  }
  if (got < header_bytes) {
    return Status::Corruption(path + ": truncated: the file ends after " + std::to_string(got) +
                              " bytes, inside the " + std::to_string(header_bytes) +
                              "-byte IDX header" + reader.ShortReadNote());
  }
  for (int d = 0; d < kind.ndims; ++d) dims[d] = BigEndian32(header + 4 + 4 * d);

  std::string promise;  // what the header promises, for messages
  int64_t expected = dims[0];
  if (kind.ndims == 3) {
    if (dims[1] < 1 || dims[1] > kMaxSide || dims[2] < 1 || dims[2] > kMaxSide) {
      return Status::Corruption(path + ": implausible image size " + std::to_string(dims[1]) + "x" +
                                std::to_string(dims[2]) + " in the header (rows and cols must be in [1, " +
                                std::to_string(kMaxSide) + "])");
    }
    expected = int64_t{dims[0]} * dims[1] * dims[2];
    promise = std::to_string(dims[0]) + " images of " + std::to_string(dims[1]) + "x" +
              std::to_string(dims[2]) + " (" + std::to_string(expected) + " bytes of pixels)";
  } else {
    promise = std::to_string(dims[0]) + " labels (" + std::to_string(expected) + " bytes)";
  }
  const char* payload_name = kind.ndims == 3 ? " bytes of pixels" : " bytes of labels";

  std::vector<uint8_t> buf;
  buf.reserve(static_cast<size_t>(std::min(expected, kReadSlice)));
  int64_t done = 0;
  while (done < expected) {
    const int64_t want = std::min(expected - done, kReadSlice);
    buf.resize(static_cast<size_t>(done + want));
    DTRAIN_RETURN_IF_ERROR(reader.Read(buf.data() + done, want, &got));
    done += got;
    if (got < want) {
      return Status::Corruption(path + ": truncated: header promises " + promise +
                                " but the file ends after " + std::to_string(header_bytes + done) + " bytes (" +
                                std::to_string(header_bytes) + "-byte header + " + std::to_string(done) +
                                payload_name + ")" + reader.ShortReadNote());
    }
  }
  int64_t trailing = 0;
  DTRAIN_RETURN_IF_ERROR(reader.CountRemaining(&trailing));
  if (trailing > 0) {
    return Status::Corruption(path + ": " + std::to_string(trailing) + " unexpected trailing bytes: header promises " +
                              promise + " but the file holds " + std::to_string(header_bytes + expected + trailing) +
                              " bytes, " + std::to_string(header_bytes) + "-byte header included");
  }
  if (buf.capacity() != buf.size()) buf.shrink_to_fit();
  *payload = std::move(buf);
  return Status::OK();
}

bool FileExists(const std::string& path) {
  std::error_code ec;
  return std::filesystem::exists(path, ec);
}

// dir/<prefix>-<kind>-ubyte.gz, or without .gz when only that exists. When
// neither exists returns NotFound naming both.
Status FindIdxFile(const FashionMnistOptions& options, const char* stem, const char* what,
                   std::string* path) {
  std::string dir = options.dir.empty() ? std::string(".") : options.dir;
  if (dir.back() != '/') dir += '/';
  const char* prefix = options.split == Split::kTrain ? "train" : "t10k";
  const std::string plain = dir + prefix + "-" + stem;
  const std::string gz = plain + ".gz";
  if (FileExists(gz)) {
    *path = gz;
  } else if (FileExists(plain)) {
    *path = plain;
  } else {
    return Status::NotFound(std::string("Fashion-MNIST ") + SplitName(options.split) + " " + what +
                            " not found: neither " + gz + " nor " + plain +
                            " exists; install the Debian package dataset-fashion-mnist "
                            "(apt-get install dataset-fashion-mnist) or set data.dir to the directory "
                            "that holds the IDX files");
  }
  return Status::OK();
}

}  // namespace

const char* SplitName(Split split) { return split == Split::kTrain ? "train" : "test"; }

const std::array<const char*, 10>& ClassNames() {
  static const std::array<const char*, 10> kNames = {"T-shirt/top", "Trouser", "Pullover", "Dress",
                                                     "Coat",        "Sandal",  "Shirt",    "Sneaker",
                                                     "Bag",         "Ankle boot"};
  return kNames;
}

Status ReadIdxImages(const std::string& path, std::vector<uint8_t>* pixels, int64_t* count, int* rows,
                     int* cols) {
  uint32_t dims[3] = {};
  std::vector<uint8_t> payload;
  DTRAIN_RETURN_IF_ERROR(ReadIdxFile(path, kImagesKind, dims, &payload));
  *pixels = std::move(payload);
  *count = dims[0];
  *rows = static_cast<int>(dims[1]);
  *cols = static_cast<int>(dims[2]);
  return Status::OK();
}

Status ReadIdxLabels(const std::string& path, std::vector<uint8_t>* labels, int64_t* count) {
  uint32_t dims[3] = {};
  std::vector<uint8_t> payload;
  DTRAIN_RETURN_IF_ERROR(ReadIdxFile(path, kLabelsKind, dims, &payload));
  *labels = std::move(payload);
  *count = dims[0];
  return Status::OK();
}

Status LoadFashionMnist(const FashionMnistOptions& options, Dataset* out) {
  if (options.limit < 0) {
    return Status::InvalidArgument("Fashion-MNIST limit must be >= 0 (0 = the whole split), got " +
                                   std::to_string(options.limit));
  }
  std::string images_path, labels_path;
  DTRAIN_RETURN_IF_ERROR(FindIdxFile(options, "images-idx3-ubyte", "images", &images_path));
  DTRAIN_RETURN_IF_ERROR(FindIdxFile(options, "labels-idx1-ubyte", "labels", &labels_path));

  Dataset ds;
  DTRAIN_RETURN_IF_ERROR(ReadIdxImages(images_path, &ds.images, &ds.size, &ds.rows, &ds.cols));
  int64_t label_count = 0;
  DTRAIN_RETURN_IF_ERROR(ReadIdxLabels(labels_path, &ds.labels, &label_count));
  if (label_count != ds.size) {
    return Status::Corruption(std::string("Fashion-MNIST ") + SplitName(options.split) + ": " + images_path +
                              " has " + std::to_string(ds.size) + " images but " + labels_path + " has " +
                              std::to_string(label_count) + " labels");
  }
  for (int64_t i = 0; i < label_count; ++i) {
    if (ds.labels[i] >= ds.num_classes) {
      return Status::Corruption(labels_path + ": label " + std::to_string(ds.labels[i]) + " at index " +
                                std::to_string(i) + " is out of range [0, " + std::to_string(ds.num_classes - 1) +
                                "]");
    }
  }
  if (!options.classes.empty()) {
    bool keep[256] = {};
    for (int c : options.classes) {
      if (c < 0 || c >= ds.num_classes) {
        return Status::InvalidArgument("Fashion-MNIST classes: " + std::to_string(c) + " is not a class (0-" +
                                       std::to_string(ds.num_classes - 1) + ")");
      }
      keep[c] = true;
    }
    const size_t pixels = static_cast<size_t>(ds.rows) * static_cast<size_t>(ds.cols);
    int64_t kept = 0;
    for (int64_t i = 0; i < ds.size; ++i) {
      if (!keep[ds.labels[static_cast<size_t>(i)]]) continue;
      if (kept != i) {
        std::copy_n(ds.images.data() + static_cast<size_t>(i) * pixels, pixels,
                    ds.images.data() + static_cast<size_t>(kept) * pixels);
        ds.labels[static_cast<size_t>(kept)] = ds.labels[static_cast<size_t>(i)];
      }
      ++kept;
    }
    ds.size = kept;
    ds.images.resize(static_cast<size_t>(kept) * pixels);
    ds.labels.resize(static_cast<size_t>(kept));
  }
  if (options.limit > 0 && options.limit < ds.size) {
    ds.size = options.limit;
    ds.images.resize(static_cast<size_t>(ds.size * ds.rows * ds.cols));
    ds.images.shrink_to_fit();
    ds.labels.resize(static_cast<size_t>(ds.size));
    ds.labels.shrink_to_fit();
  }
  ds.source = images_path + ", " + labels_path;
  *out = std::move(ds);
  return Status::OK();
}

DatasetSummary Summarize(const Dataset& dataset) {
  DatasetSummary s;
  s.size = dataset.size;
  s.rows = dataset.rows;
  s.cols = dataset.cols;
  for (uint8_t label : dataset.labels) {
    if (label < s.per_class.size()) ++s.per_class[label];
  }
  std::array<int64_t, 256> histogram{};
  for (uint8_t p : dataset.images) ++histogram[p];
  const double n = static_cast<double>(dataset.images.size());
  if (n == 0) return s;
  // The integer sum is exact and cannot overflow below 2^55 pixels.
  int64_t sum = 0;
  for (int v = 0; v < 256; ++v) sum += histogram[v] * v;
  const double mean = static_cast<double>(sum) / n / 255.0;
  double var = 0.0;
  for (int v = 0; v < 256; ++v) {
    const double d = v / 255.0 - mean;
    var += static_cast<double>(histogram[v]) * d * d;
  }
  s.pixel_mean = mean;
  s.pixel_std = std::sqrt(var / n);
  return s;
}

}  // namespace dtrain::data
