#include "dtrain/data/draw.h"

#include <algorithm>
#include <cmath>

namespace dtrain::data {

void RgbCanvas::Reset(RgbImage* image, int rows, int cols, const uint8_t rgb[3]) {
  image->rows = rows;
  image->cols = cols;
  image->pixels.resize(static_cast<size_t>(rows) * static_cast<size_t>(cols) * 3);
  for (size_t i = 0; i < image->pixels.size(); i += 3) {
    image->pixels[i] = rgb[0];
    image->pixels[i + 1] = rgb[1];
    image->pixels[i + 2] = rgb[2];
  }
}

void RgbCanvas::Set(int y, int x, const uint8_t rgb[3]) {
  if (y < 0 || x < 0 || y >= img_->rows || x >= img_->cols) return;
  uint8_t* p = &img_->pixels[(static_cast<size_t>(y) * img_->cols + x) * 3];
  p[0] = rgb[0];
  p[1] = rgb[1];
  p[2] = rgb[2];
}

void RgbCanvas::Gray(int y0, int x0, const GrayImage& g) {
  for (int y = 0; y < g.rows; ++y) {
    for (int x = 0; x < g.cols; ++x) {
      const uint8_t v = g.pixels[static_cast<size_t>(y) * g.cols + x];
      const uint8_t rgb[3] = {v, v, v};
      Set(y0 + y, x0 + x, rgb);
    }
  }
}

void RgbCanvas::Fill(int y0, int x0, int h, int w, const uint8_t rgb[3]) {
  for (int y = y0; y < y0 + h; ++y) {
    for (int x = x0; x < x0 + w; ++x) Set(y, x, rgb);
  }
}

void RgbCanvas::Box(int y0, int x0, int rows, int cols, const SnapBox& box, int line, const uint8_t rgb[3]) {
  const int bx0 = std::clamp(static_cast<int>(std::floor(box.x0)), 0, cols - 1);
  const int by0 = std::clamp(static_cast<int>(std::floor(box.y0)), 0, rows - 1);
  const int bx1 = std::clamp(static_cast<int>(std::ceil(box.x1)) - 1, 0, cols - 1);
  const int by1 = std::clamp(static_cast<int>(std::ceil(box.y1)) - 1, 0, rows - 1);
  for (int t = 0; t < line; ++t) {
    for (int x = bx0; x <= bx1; ++x) {
      Set(y0 + std::min(by0 + t, by1), x0 + x, rgb);
      Set(y0 + std::max(by1 - t, by0), x0 + x, rgb);
    }
    for (int y = by0; y <= by1; ++y) {
      Set(y0 + y, x0 + std::min(bx0 + t, bx1), rgb);
      Set(y0 + y, x0 + std::max(bx1 - t, bx0), rgb);
    }
  }
}

}  // namespace dtrain::data
