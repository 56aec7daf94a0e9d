// Image files: reading a user's catalogue or snaps as 8-bit grayscale PNG
// (libpng) and PGM (P5 binary and P2 plain), the formats dtrain's grayscale
// models take; writing 8-bit grayscale and RGB PNGs. Colour, alpha and 16-bit
// images are refused with a message saying what the file is, rather than
// converted behind the user's back.
//
// Thread-safety: the functions share no state.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "dtrain/common/status.h"

namespace dtrain::data {

struct GrayImage {
  int rows = 0;
  int cols = 0;
  std::vector<uint8_t> pixels;  // rows * cols bytes, row-major
};

// Decodes a PNG or PGM file's bytes (the format is told by its signature).
// `name` is used in messages. InvalidArgument for an unknown format, a
// colour, alpha or 16-bit image; Corruption for a damaged file. *out is set
// only on success.
Status DecodeGrayImage(std::string_view bytes, const std::string& name, GrayImage* out);

// Reads and decodes a file. NotFound / IOError when it cannot be read.
Status ReadGrayImage(const std::string& path, GrayImage* out);

// Writes an 8-bit grayscale PNG (for tests, and `dtrain data` exports).
// Creates missing parent directories. InvalidArgument when the pixel count
// is not rows * cols; IOError when the file cannot be written.
Status WriteGrayPng(const std::string& path, const GrayImage& image);

struct RgbImage {
  int rows = 0;
  int cols = 0;
  std::vector<uint8_t> pixels;  // rows * cols * 3 bytes, row-major, R G B per pixel
};

// Writes an 8-bit RGB PNG (pictures of results, e.g. boxes drawn on a snap).
// Same directory creation and errors as WriteGrayPng.
Status WriteRgbPng(const std::string& path, const RgbImage& image);

// True for the file extensions a directory gallery picks up: .png, .pgm
// (any case).
bool IsImageFileName(const std::string& name);

}  // namespace dtrain::data
