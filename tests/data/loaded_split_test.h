// The real Fashion-MNIST splits for the data tests, each (split, limit)
// loaded at most once per test binary.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <memory>
#include <utility>

#include "dtrain/data/fashion_mnist.h"

namespace dtrain::data::testing {

inline constexpr char kDatasetDir[] = "/usr/share/datasets/fashion-mnist";

// The split from Debian's dataset-fashion-mnist; limit > 0 keeps its first
// `limit` images.
inline const Dataset& LoadedSplit(Split split, int64_t limit = 0) {
  static std::map<std::pair<Split, int64_t>, std::unique_ptr<Dataset>> loaded;
  std::unique_ptr<Dataset>& ds = loaded[{split, limit}];
  if (!ds) {
    ds = std::make_unique<Dataset>();
    FashionMnistOptions options;
    options.dir = kDatasetDir;
    options.split = split;
    options.limit = limit;
    const Status s = LoadFashionMnist(options, ds.get());
    EXPECT_TRUE(s.ok()) << s;
  }
  return *ds;
}

}  // namespace dtrain::data::testing
