#include "dtrain/data/image_io.h"

#include <png.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace dtrain::data {
namespace {

constexpr int kMaxSide = 1 << 14;

Status DecodePng(std::string_view bytes, const std::string& name, GrayImage* out) {
  png_image image;
  std::memset(&image, 0, sizeof image);
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&image, bytes.data(), bytes.size())) {
    return Status::Corruption(name + ": not a readable PNG (" + image.message + ")");
  }
  const png_uint_32 format = image.format;
  auto refuse = [&](const std::string& what) {
    png_image_free(&image);
    return Status::InvalidArgument(name + ": " + what + "; dtrain's models take 8-bit grayscale images (convert it first, "
                                          "e.g. `convert IN -colorspace Gray -depth 8 OUT.png`)");
  };
  if ((format & PNG_FORMAT_FLAG_COLOR) != 0) return refuse("is a colour PNG");
  if ((format & PNG_FORMAT_FLAG_ALPHA) != 0) return refuse("has an alpha channel");
  if ((format & PNG_FORMAT_FLAG_LINEAR) != 0) return refuse("is a 16-bit PNG");
  if (image.width == 0 || image.height == 0 || image.width > kMaxSide || image.height > kMaxSide) {
    png_image_free(&image);
    return Status::InvalidArgument(name + ": unsupported size " + std::to_string(image.width) + "x" +
                                   std::to_string(image.height));
  }
  image.format = PNG_FORMAT_GRAY;
  GrayImage g;
  g.rows = static_cast<int>(image.height);
  g.cols = static_cast<int>(image.width);
  g.pixels.resize(static_cast<size_t>(g.rows) * g.cols);
  if (!png_image_finish_read(&image, nullptr, g.pixels.data(), 0, nullptr)) {
    const std::string msg = image.message;
    png_image_free(&image);
    return Status::Corruption(name + ": PNG data is damaged (" + msg + ")");
  }
  png_image_free(&image);
  *out = std::move(g);
  return Status::OK();
}

// PGM (Netpbm): "P5" or "P2", width, height, maxval, separated by whitespace
// and '#' comments; then one whitespace byte and the pixels.
Status DecodePgm(std::string_view bytes, const std::string& name, GrayImage* out) {
  size_t pos = 2;
  auto skip_space = [&] {
    while (pos < bytes.size()) {
      if (std::isspace(static_cast<unsigned char>(bytes[pos]))) {
        ++pos;
      } else if (bytes[pos] == '#') {
        while (pos < bytes.size() && bytes[pos] != '\n') ++pos;
      } else {
        break;
      }
    }
  };
  auto number = [&](const char* what, long* v) -> Status {
    skip_space();
    if (pos >= bytes.size() || !std::isdigit(static_cast<unsigned char>(bytes[pos]))) {
      return Status::Corruption(name + ": PGM header has no " + what);
    }
    long x = 0;
    while (pos < bytes.size() && std::isdigit(static_cast<unsigned char>(bytes[pos]))) {
      x = x * 10 + (bytes[pos++] - '0');
      if (x > (1L << 30)) return Status::Corruption(name + ": PGM " + what + " is too large");
    }
    *v = x;
    return Status::OK();
  };
  const bool binary = bytes[1] == '5';
  long w = 0, h = 0, maxval = 0;
  DTRAIN_RETURN_IF_ERROR(number("width", &w));
  DTRAIN_RETURN_IF_ERROR(number("height", &h));
  DTRAIN_RETURN_IF_ERROR(number("maxval", &maxval));
  if (w <= 0 || h <= 0 || w > kMaxSide || h > kMaxSide) {
    return Status::InvalidArgument(name + ": unsupported size " + std::to_string(w) + "x" + std::to_string(h));
  }
  if (maxval <= 0) return Status::Corruption(name + ": PGM maxval must be positive");
  if (maxval > 255) {
    return Status::InvalidArgument(name + ": is a 16-bit PGM (maxval " + std::to_string(maxval) +
                                   "); dtrain's models take 8-bit grayscale images");
  }
  GrayImage g;
  g.rows = static_cast<int>(h);
  g.cols = static_cast<int>(w);
  const size_t n = static_cast<size_t>(w) * static_cast<size_t>(h);
  g.pixels.resize(n);
  if (binary) {
    ++pos;  // the single whitespace byte after maxval
    if (bytes.size() < pos + n) {
      return Status::Corruption(name + ": truncated PGM: " + std::to_string(bytes.size() - std::min(pos, bytes.size())) +
                                " pixel bytes of " + std::to_string(n));
    }
    std::memcpy(g.pixels.data(), bytes.data() + pos, n);
  } else {
    for (size_t i = 0; i < n; ++i) {
      long v = 0;
      Status st = number("pixel", &v);
      if (!st.ok()) return Status::Corruption(name + ": truncated plain PGM at pixel " + std::to_string(i));
      if (v > maxval) return Status::Corruption(name + ": pixel " + std::to_string(i) + " exceeds maxval");
      g.pixels[i] = static_cast<uint8_t>(v);
    }
  }
  if (maxval != 255) {
    for (uint8_t& p : g.pixels) p = static_cast<uint8_t>((static_cast<int>(p) * 255 + maxval / 2) / maxval);
  }
  *out = std::move(g);
  return Status::OK();
}

}  // namespace

Status DecodeGrayImage(std::string_view bytes, const std::string& name, GrayImage* out) {
  static const unsigned char kPngSig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (bytes.size() >= 8 && std::memcmp(bytes.data(), kPngSig, 8) == 0) return DecodePng(bytes, name, out);
  if (bytes.size() >= 2 && bytes[0] == 'P' && (bytes[1] == '5' || bytes[1] == '2')) return DecodePgm(bytes, name, out);
  if (bytes.size() >= 2 && bytes[0] == 'P' && (bytes[1] == '6' || bytes[1] == '3')) {
    return Status::InvalidArgument(name + ": is a colour PPM; dtrain's models take 8-bit grayscale images");
  }
  if (bytes.empty()) return Status::Corruption(name + ": empty file");
  return Status::InvalidArgument(name + ": not a PNG or PGM image");
}

Status ReadGrayImage(const std::string& path, GrayImage* out) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return Status::NotFound("image " + path + " does not exist");
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError("cannot open " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return Status::IOError("cannot read " + path);
  const std::string bytes = ss.str();
  return DecodeGrayImage(bytes, path, out);
}

namespace {

Status WritePng(const std::string& path, const char* what, int rows, int cols, size_t channels,
                const std::vector<uint8_t>& pixels, png_uint_32 format) {
  if (rows <= 0 || cols <= 0 || rows > kMaxSide || cols > kMaxSide ||
      pixels.size() != static_cast<size_t>(rows) * static_cast<size_t>(cols) * channels) {
    return Status::InvalidArgument(std::string(what) + " " + path + ": " + std::to_string(pixels.size()) +
                                   " pixel bytes do not match " + std::to_string(rows) + "x" + std::to_string(cols) +
                                   (channels == 1 ? "" : "x" + std::to_string(channels)));
  }
  std::error_code ec;
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  png_image img;
  std::memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  img.width = static_cast<png_uint_32>(cols);
  img.height = static_cast<png_uint_32>(rows);
  img.format = format;
  if (!png_image_write_to_file(&img, path.c_str(), 0, pixels.data(), 0, nullptr)) {
    const std::string msg = img.message;
    png_image_free(&img);
    return Status::IOError("cannot write " + path + ": " + msg);
  }
  return Status::OK();
}

}  // namespace

Status WriteGrayPng(const std::string& path, const GrayImage& image) {
  return WritePng(path, "WriteGrayPng", image.rows, image.cols, 1, image.pixels, PNG_FORMAT_GRAY);
}

Status WriteRgbPng(const std::string& path, const RgbImage& image) {
  return WritePng(path, "WriteRgbPng", image.rows, image.cols, 3, image.pixels, PNG_FORMAT_RGB);
}

bool IsImageFileName(const std::string& name) {
  std::string ext = std::filesystem::path(name).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == ".png" || ext == ".pgm";
}

}  // namespace dtrain::data
