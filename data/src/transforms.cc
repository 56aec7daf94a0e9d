#include "dtrain/data/transforms.h"

#include <cmath>
#include <cstring>
#include <string>

namespace dtrain::data {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
constexpr int kMaxPad = 64;

// splitmix64's output function.
uint64_t Finalize(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t SplitMix64(uint64_t* state) {
  *state += kGolden;
  return Finalize(*state);
}

uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

}  // namespace

Rng::Rng(uint64_t seed) {
  uint64_t sm = seed;
  for (uint64_t& s : s_) s = SplitMix64(&sm);
}

uint64_t Rng::Next() {
  const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = Rotl(s_[3], 45);
  return result;
}

uint64_t Rng::Uniform(uint64_t n) {
  DTRAIN_CHECK(n > 0);
  // 2^64 mod n: values below it would make the low residues more likely.
  const uint64_t threshold = (0 - n) % n;
  for (;;) {
    const uint64_t r = Next();
    if (r >= threshold) return r % n;
  }
}

double Rng::UniformDouble() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

uint64_t Rng::Mix(uint64_t a, uint64_t b) { return Finalize(Finalize(a + kGolden) ^ (b + 2 * kGolden)); }

Status NormalizeOptions::Validate() const {
  if (!std::isfinite(mean) || !std::isfinite(std) || !(std > 0.0f)) {
    return Status::InvalidArgument("normalize: std must be > 0 and mean, std finite; got mean " +
                                   std::to_string(mean) + ", std " + std::to_string(std));
  }
  return Status::OK();
}

Status AugmentOptions::Validate() const {
  if (pad < 0 || pad > kMaxPad) {
    return Status::InvalidArgument("augment: pad must be in [0, " + std::to_string(kMaxPad) + "], got " +
                                   std::to_string(pad));
  }
  return Status::OK();
}

void NormalizeImage(const uint8_t* src, int rows, int cols, const NormalizeOptions& options, float* dst) {
  // One table lookup per pixel; each entry is computed with the formula the
  // header states, so results equal the direct computation bit for bit.
  float table[256];
  for (int v = 0; v < 256; ++v) table[v] = (static_cast<float>(v) / 255.0f - options.mean) / options.std;
  const int64_t n = static_cast<int64_t>(rows) * cols;
  for (int64_t i = 0; i < n; ++i) dst[i] = table[src[i]];
}

uint64_t AugmentSeed(uint64_t base_seed, uint64_t epoch, int64_t sample_index) {
  return Rng::Mix(Rng::Mix(base_seed, epoch), static_cast<uint64_t>(sample_index));
}

void AugmentImage(const uint8_t* src, int rows, int cols, const AugmentOptions& options, uint64_t seed,
                  uint8_t* dst) {
  const size_t n = static_cast<size_t>(rows) * cols;
  if (!options.enabled) {
    std::memcpy(dst, src, n);
    return;
  }
  DTRAIN_CHECK(options.pad >= 0);
  Rng rng(seed);
  const int span = 2 * options.pad + 1;
  // Output (y, x) reads source (y + dy, x + dx), dy, dx in [-pad, pad].
  const int dy = static_cast<int>(rng.Uniform(span)) - options.pad;
  const int dx = static_cast<int>(rng.Uniform(span)) - options.pad;
  const bool flip = options.hflip && (rng.Next() >> 63) != 0;
  for (int y = 0; y < rows; ++y) {
    uint8_t* out = dst + static_cast<size_t>(y) * cols;
    const int sy = y + dy;
    if (sy < 0 || sy >= rows) {
      std::memset(out, 0, cols);
      continue;
    }
    const uint8_t* in = src + static_cast<size_t>(sy) * cols;
    for (int x = 0; x < cols; ++x) {
      const int cx = flip ? cols - 1 - x : x;  // column of the cropped image
      const int sx = cx + dx;
      out[x] = (sx < 0 || sx >= cols) ? 0 : in[sx];
    }
  }
}

void MakeBatch(const Dataset& dataset, const std::vector<int64_t>& indices, uint64_t base_seed, uint64_t epoch,
               const AugmentOptions* augment, const NormalizeOptions& normalize, std::vector<float>* pixels,
               std::vector<int64_t>* labels) {
  const size_t image_size = static_cast<size_t>(dataset.rows) * dataset.cols;
  pixels->resize(indices.size() * image_size);
  labels->resize(indices.size());
  std::vector<uint8_t> scratch(augment != nullptr ? image_size : 0);
  for (size_t b = 0; b < indices.size(); ++b) {
    const int64_t index = indices[b];
    DTRAIN_CHECK(index >= 0 && index < dataset.size);
    const uint8_t* image = dataset.image(index);
    if (augment != nullptr) {
      AugmentImage(image, dataset.rows, dataset.cols, *augment, AugmentSeed(base_seed, epoch, index),
                   scratch.data());
      image = scratch.data();
    }
    NormalizeImage(image, dataset.rows, dataset.cols, normalize, pixels->data() + b * image_size);
    (*labels)[b] = dataset.labels[static_cast<size_t>(index)];
  }
}

}  // namespace dtrain::data
