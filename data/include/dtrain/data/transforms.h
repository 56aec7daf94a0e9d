// Per-image transforms (augmentation, normalisation), batch assembly, and the
// deterministic random number generator every part of data/ uses.
//
// Determinism contract: given the same seeds, every function here produces
// bit-identical results on every platform and compiler. That is why Rng is
// specified exactly (xoshiro256** seeded through splitmix64) and no std::
// distribution or std::shuffle is used: their algorithms are
// implementation-defined.
//
// Thread-safety: the free functions share no state and may run concurrently.
// An Rng object must not be used from two threads at once.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/data/fashion_mnist.h"

namespace dtrain::data {

// xoshiro256** (Blackman & Vigna), its state filled from the seed by
// splitmix64. Copyable; a copy continues the same sequence.
class Rng {
 public:
  explicit Rng(uint64_t seed);

  // The next 64 random bits.
  uint64_t Next();

  // Uniform in [0, n), without modulo bias (rejection sampling).
  // Precondition: n > 0.
  uint64_t Uniform(uint64_t n);

  // Uniform in [0, 1), 53 random bits.
  double UniformDouble();

  // Fisher-Yates shuffle driven by Uniform().
  template <typename T>
  void Shuffle(std::vector<T>* v) {
    for (size_t i = v->size(); i > 1; --i) {
      const size_t j = static_cast<size_t>(Uniform(i));
      std::swap((*v)[i - 1], (*v)[j]);
    }
  }

  // Combines two values into a well-mixed 64-bit seed. Order matters:
  // Mix(a, b) != Mix(b, a) in general. Use it to derive independent seeds,
  // e.g. Mix(Mix(base_seed, epoch), sample_index).
  static uint64_t Mix(uint64_t a, uint64_t b);

 private:
  uint64_t s_[4];
};

struct NormalizeOptions {
  // dst = (src / 255 - mean) / std. Defaults: the Fashion-MNIST train split's
  // statistics, as measured by Summarize() over all 47,040,000 pixels:
  // mean 0.28604060, std 0.35302424 (population std of pixel/255).
  float mean = 0.2860f;
  float std = 0.3530f;

  // InvalidArgument unless std > 0 and both are finite.
  Status Validate() const;
};

struct AugmentOptions {
  // Default: on. When false AugmentImage copies the image.
  bool enabled = true;
  // Random crop: the image is zero-padded by `pad` pixels on every side and a
  // rows x cols window is cut at a uniform offset in [0, 2*pad] along each
  // axis. 0 disables the crop. Default: 2.
  int pad = 2;
  // Mirror left-right with probability 0.5. Default: on.
  bool hflip = true;

  // InvalidArgument unless 0 <= pad <= 64.
  Status Validate() const;
};

// Writes rows*cols floats (src[i] / 255 - mean) / std to dst.
void NormalizeImage(const uint8_t* src, int rows, int cols, const NormalizeOptions& options, float* dst);

// The seed AugmentImage gets for one sample: Mix(Mix(base_seed, epoch),
// sample_index). It depends only on the sample's dataset index, never on the
// rank, batch or position that reads it, so augmentation is the same at any
// world size.
uint64_t AugmentSeed(uint64_t base_seed, uint64_t epoch, int64_t sample_index);

// Random crop of the zero-padded image, then a horizontal flip with p = 0.5,
// both drawn from Rng(seed) in that order (row offset, column offset, flip).
// src and dst hold rows*cols bytes and must not overlap.
// Precondition: options.Validate() is OK.
void AugmentImage(const uint8_t* src, int rows, int cols, const AugmentOptions& options, uint64_t seed,
                  uint8_t* dst);

// Assembles a batch of B = indices.size() samples: *pixels gets B*rows*cols
// floats (sample-major, each image row-major, ready for a [B,1,rows,cols]
// tensor) and *labels gets B labels. Each image is augmented with
// AugmentSeed(base_seed, epoch, index) when augment is non-null (training),
// and used as is when augment is null (evaluation), then normalised.
// Preconditions: every index is in [0, dataset.size) (checked: aborts
// otherwise) and the options validate.
void MakeBatch(const Dataset& dataset, const std::vector<int64_t>& indices, uint64_t base_seed, uint64_t epoch,
               const AugmentOptions* augment, const NormalizeOptions& normalize, std::vector<float>* pixels,
               std::vector<int64_t>* labels);

}  // namespace dtrain::data
