#include "dtrain/data/transforms.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <vector>

namespace dtrain::data {
namespace {

using ::testing::HasSubstr;

// A rows x cols image whose pixels are all distinct and non-zero, so any
// crop or flip is recognisable.
std::vector<uint8_t> Gradient(int rows, int cols) {
  std::vector<uint8_t> img(static_cast<size_t>(rows) * cols);
  for (size_t i = 0; i < img.size(); ++i) img[i] = static_cast<uint8_t>(1 + i);
  return img;
}

// img shifted so that out(y, x) = img(y + dy, x + dx), zero outside.
std::vector<uint8_t> Shifted(const std::vector<uint8_t>& img, int rows, int cols, int dy, int dx) {
  std::vector<uint8_t> out(img.size(), 0);
  for (int y = 0; y < rows; ++y) {
    for (int x = 0; x < cols; ++x) {
      const int sy = y + dy, sx = x + dx;
      if (sy >= 0 && sy < rows && sx >= 0 && sx < cols) out[y * cols + x] = img[sy * cols + sx];
    }
  }
  return out;
}

std::vector<uint8_t> Mirrored(const std::vector<uint8_t>& img, int rows, int cols) {
  std::vector<uint8_t> out(img.size());
  for (int y = 0; y < rows; ++y) {
    for (int x = 0; x < cols; ++x) out[y * cols + x] = img[y * cols + (cols - 1 - x)];
  }
  return out;
}

std::vector<uint8_t> Augmented(const std::vector<uint8_t>& img, int rows, int cols, const AugmentOptions& options,
                               uint64_t seed) {
  std::vector<uint8_t> out(img.size(), 0xAA);
  AugmentImage(img.data(), rows, cols, options, seed, out.data());
  return out;
}

TEST(RngTest, SequenceIsPinnedAcrossPlatforms) {
  // xoshiro256** seeded by splitmix64(42); checked against an independent
  // implementation of the published reference algorithms.
  Rng rng(42);
  EXPECT_EQ(rng.Next(), 0x15780b2e0c2ec716ull);
  EXPECT_EQ(rng.Next(), 0x6104d9866d113a7eull);
  EXPECT_EQ(rng.Next(), 0xae17533239e499a1ull);
  EXPECT_EQ(Rng::Mix(1, 2), 0xbf7f6a7a7887b1eeull);
  Rng zero(0);
  EXPECT_EQ(zero.Uniform(10), 0u);
  EXPECT_EQ(zero.Uniform(10), 2u);
  EXPECT_EQ(zero.Uniform(1000000), 508768u);
}

TEST(RngTest, SameSeedSameSequenceAndDifferentSeedsDiffer) {
  Rng a(7), b(7), c(8);
  bool any_diff = false;
  for (int i = 0; i < 100; ++i) {
    const uint64_t va = a.Next();
    EXPECT_EQ(va, b.Next());
    any_diff |= va != c.Next();
  }
  EXPECT_TRUE(any_diff);
}

TEST(RngTest, UniformStaysInRangeAndHitsEveryValue) {
  Rng rng(123);
  std::vector<int> hits(7, 0);
  for (int i = 0; i < 7000; ++i) {
    const uint64_t v = rng.Uniform(7);
    ASSERT_LT(v, 7u);
    ++hits[v];
  }
  for (int h : hits) EXPECT_NEAR(h, 1000, 150);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(rng.Uniform(1), 0u);
  // A bound just above 2^63 rejects about half the draws; it must still end.
  const uint64_t big = (uint64_t{1} << 63) + 1;
  for (int i = 0; i < 100; ++i) EXPECT_LT(rng.Uniform(big), big);
}

TEST(RngTest, UniformDoubleIsInUnitIntervalWithMeanOneHalf) {
  Rng rng(5);
  double sum = 0;
  for (int i = 0; i < 10000; ++i) {
    const double v = rng.UniformDouble();
    ASSERT_GE(v, 0.0);
    ASSERT_LT(v, 1.0);
    sum += v;
  }
  EXPECT_NEAR(sum / 10000, 0.5, 0.02);
}

TEST(RngTest, ShuffleIsAPermutationAndDeterministic) {
  std::vector<int> a(50), b;
  for (int i = 0; i < 50; ++i) a[i] = i;
  b = a;
  Rng r1(9), r2(9);
  r1.Shuffle(&a);
  r2.Shuffle(&b);
  EXPECT_EQ(a, b);
  EXPECT_EQ(std::set<int>(a.begin(), a.end()).size(), 50u);
  std::vector<int> identity(50);
  for (int i = 0; i < 50; ++i) identity[i] = i;
  EXPECT_NE(a, identity);
}

TEST(RngTest, MixIsOrderSensitive) {
  EXPECT_NE(Rng::Mix(1, 2), Rng::Mix(2, 1));
  EXPECT_NE(Rng::Mix(0, 0), 0u);
  EXPECT_NE(Rng::Mix(0, 1), Rng::Mix(0, 2));
}

TEST(AugmentTest, SameSeedGivesSameImage) {
  const std::vector<uint8_t> img = Gradient(8, 8);
  const AugmentOptions options;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    EXPECT_EQ(Augmented(img, 8, 8, options, seed), Augmented(img, 8, 8, options, seed));
  }
}

TEST(AugmentTest, DifferentSeedsGiveDifferentImages) {
  const std::vector<uint8_t> img = Gradient(8, 8);
  const AugmentOptions options;
  std::set<std::vector<uint8_t>> distinct;
  for (uint64_t seed = 0; seed < 100; ++seed) distinct.insert(Augmented(img, 8, 8, options, seed));
  // 5 x 5 offsets x 2 flips = 50 possible outcomes.
  EXPECT_GT(distinct.size(), 30u);
}

TEST(AugmentTest, ZeroPadWithoutFlipIsIdentity) {
  const std::vector<uint8_t> img = Gradient(5, 7);
  AugmentOptions options;
  options.pad = 0;
  options.hflip = false;
  for (uint64_t seed = 0; seed < 10; ++seed) EXPECT_EQ(Augmented(img, 5, 7, options, seed), img);
}

TEST(AugmentTest, DisabledIsIdentity) {
  const std::vector<uint8_t> img = Gradient(5, 7);
  AugmentOptions options;
  options.enabled = false;
  for (uint64_t seed = 0; seed < 10; ++seed) EXPECT_EQ(Augmented(img, 5, 7, options, seed), img);
}

TEST(AugmentTest, FlipMirrorsAHandMadeImageAboutHalfTheTime) {
  // 2 x 3 image:  1 2 3      mirrored:  3 2 1
  //               4 5 6                 6 5 4
  const std::vector<uint8_t> img = {1, 2, 3, 4, 5, 6};
  const std::vector<uint8_t> mirrored = {3, 2, 1, 6, 5, 4};
  EXPECT_EQ(Mirrored(img, 2, 3), mirrored);
  AugmentOptions options;
  options.pad = 0;
  int flips = 0;
  for (uint64_t seed = 0; seed < 1000; ++seed) {
    const std::vector<uint8_t> out = Augmented(img, 2, 3, options, seed);
    if (out == mirrored) {
      ++flips;
    } else {
      EXPECT_EQ(out, img) << "seed " << seed;
    }
  }
  EXPECT_NEAR(flips, 500, 60);
}

TEST(AugmentTest, CropIsAShiftWithinThePadding) {
  const int rows = 6, cols = 5;
  const std::vector<uint8_t> img = Gradient(rows, cols);
  AugmentOptions options;
  options.pad = 2;
  options.hflip = false;
  std::set<std::pair<int, int>> offsets_seen;
  for (uint64_t seed = 0; seed < 400; ++seed) {
    const std::vector<uint8_t> out = Augmented(img, rows, cols, options, seed);
    bool matched = false;
    for (int dy = -2; dy <= 2 && !matched; ++dy) {
      for (int dx = -2; dx <= 2 && !matched; ++dx) {
        if (out == Shifted(img, rows, cols, dy, dx)) {
          matched = true;
          offsets_seen.insert({dy, dx});
        }
      }
    }
    EXPECT_TRUE(matched) << "seed " << seed;
  }
  EXPECT_EQ(offsets_seen.size(), 25u);
}

TEST(AugmentTest, SeedDependsOnBaseEpochAndIndexOnly) {
  EXPECT_EQ(AugmentSeed(1, 2, 3), Rng::Mix(Rng::Mix(1, 2), 3));
  EXPECT_NE(AugmentSeed(1, 2, 3), AugmentSeed(1, 3, 3));
  EXPECT_NE(AugmentSeed(1, 2, 3), AugmentSeed(1, 2, 4));
  EXPECT_NE(AugmentSeed(1, 2, 3), AugmentSeed(2, 2, 3));
}

TEST(AugmentTest, OptionsAreValidated) {
  AugmentOptions options;
  EXPECT_TRUE(options.Validate().ok());
  options.pad = -1;
  EXPECT_THAT(options.Validate().message(), HasSubstr("pad must be in [0, 64], got -1"));
  NormalizeOptions normalize;
  EXPECT_TRUE(normalize.Validate().ok());
  normalize.std = 0;
  EXPECT_EQ(normalize.Validate().code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(normalize.Validate().message(), HasSubstr("std must be > 0"));
}

TEST(NormalizeTest, MapsPixelsToStandardScores) {
  const std::vector<uint8_t> img = {0, 255, 51, 102};
  NormalizeOptions options;
  options.mean = 0.5f;
  options.std = 0.25f;
  std::vector<float> out(4);
  NormalizeImage(img.data(), 2, 2, options, out.data());
  EXPECT_FLOAT_EQ(out[0], -2.0f);
  EXPECT_FLOAT_EQ(out[1], 2.0f);
  EXPECT_FLOAT_EQ(out[2], (0.2f - 0.5f) / 0.25f);
  EXPECT_FLOAT_EQ(out[3], (0.4f - 0.5f) / 0.25f);
}

TEST(NormalizeTest, DefaultsAreFashionMnistStatistics) {
  const NormalizeOptions options;
  const uint8_t black = 0;
  float out = 0;
  NormalizeImage(&black, 1, 1, options, &out);
  EXPECT_NEAR(out, -0.2860f / 0.3530f, 1e-6);
}

Dataset TinyDataset() {
  Dataset ds;
  ds.size = 3;
  ds.rows = 4;
  ds.cols = 4;
  for (int i = 0; i < 3; ++i) {
    const std::vector<uint8_t> img = Gradient(4, 4);
    for (uint8_t p : img) ds.images.push_back(static_cast<uint8_t>(p * (i + 1)));
  }
  ds.labels = {5, 0, 9};
  return ds;
}

TEST(MakeBatchTest, EvaluationBatchIsTheNormalisedImages) {
  const Dataset ds = TinyDataset();
  const NormalizeOptions normalize;
  std::vector<float> pixels;
  std::vector<int64_t> labels;
  MakeBatch(ds, {2, 0}, 1, 0, nullptr, normalize, &pixels, &labels);
  ASSERT_EQ(pixels.size(), 2u * 16);
  EXPECT_EQ(labels, (std::vector<int64_t>{9, 5}));
  std::vector<float> expected(16);
  NormalizeImage(ds.image(2), 4, 4, normalize, expected.data());
  EXPECT_EQ(std::vector<float>(pixels.begin(), pixels.begin() + 16), expected);
  NormalizeImage(ds.image(0), 4, 4, normalize, expected.data());
  EXPECT_EQ(std::vector<float>(pixels.begin() + 16, pixels.end()), expected);
}

TEST(MakeBatchTest, AugmentationOfASampleDoesNotDependOnItsBatch) {
  const Dataset ds = TinyDataset();
  const AugmentOptions augment;
  const NormalizeOptions normalize;
  std::vector<float> a, b;
  std::vector<int64_t> la, lb;
  MakeBatch(ds, {1, 2}, 77, 3, &augment, normalize, &a, &la);
  MakeBatch(ds, {0, 2, 1}, 77, 3, &augment, normalize, &b, &lb);
  // Sample 2: position 1 in a, position 1 in b; sample 1: position 0 in a, 2 in b.
  EXPECT_EQ(std::vector<float>(a.begin() + 16, a.begin() + 32), std::vector<float>(b.begin() + 16, b.begin() + 32));
  EXPECT_EQ(std::vector<float>(a.begin(), a.begin() + 16), std::vector<float>(b.begin() + 32, b.end()));
  // And matches AugmentImage with AugmentSeed.
  std::vector<uint8_t> aug(16);
  AugmentImage(ds.image(2), 4, 4, augment, AugmentSeed(77, 3, 2), aug.data());
  std::vector<float> expected(16);
  NormalizeImage(aug.data(), 4, 4, normalize, expected.data());
  EXPECT_EQ(std::vector<float>(a.begin() + 16, a.begin() + 32), expected);
}

TEST(MakeBatchTest, EpochChangesTheAugmentation) {
  const Dataset ds = TinyDataset();
  const AugmentOptions augment;
  const NormalizeOptions normalize;
  std::vector<int64_t> labels;
  std::set<std::vector<float>> distinct;
  for (uint64_t epoch = 0; epoch < 10; ++epoch) {
    std::vector<float> pixels;
    MakeBatch(ds, {0, 1, 2}, 77, epoch, &augment, normalize, &pixels, &labels);
    distinct.insert(pixels);
  }
  EXPECT_GT(distinct.size(), 5u);
}

}  // namespace
}  // namespace dtrain::data
