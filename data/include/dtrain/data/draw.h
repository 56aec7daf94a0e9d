// Drawing on RGB pictures (data/image_io.h RgbImage): grayscale images as
// tiles, filled rectangles and box outlines, for the pictures dtrain writes
// (snap query results, detector evaluation).
//
// Thread-safety: an RgbCanvas draws on one image from one thread.
#pragma once

#include <cstdint>

#include "dtrain/data/image_io.h"
#include "dtrain/data/snaps.h"

namespace dtrain::data {

class RgbCanvas {
 public:
  // Draws on *image (not owned; rows, cols and pixels set by the caller).
  explicit RgbCanvas(RgbImage* image) : img_(image) {}

  // Makes *image a rows x cols picture filled with `rgb`.
  static void Reset(RgbImage* image, int rows, int cols, const uint8_t rgb[3]);

  // One pixel; outside the picture: nothing.
  void Set(int y, int x, const uint8_t rgb[3]);
  // A grayscale image with its top-left corner at (y0, x0).
  void Gray(int y0, int x0, const GrayImage& g);
  void Fill(int y0, int x0, int h, int w, const uint8_t rgb[3]);
  // The outline of `box` (pixel coordinates in the tile at y0, x0 of rows x
  // cols), `line` pixels wide, inside the box and the tile.
  void Box(int y0, int x0, int rows, int cols, const SnapBox& box, int line, const uint8_t rgb[3]);

 private:
  RgbImage* img_;
};

}  // namespace dtrain::data
