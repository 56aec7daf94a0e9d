#include "dtrain/data/sampler.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <vector>

namespace dtrain::data {
namespace {

using ::testing::HasSubstr;
using Batches = std::vector<std::vector<int64_t>>;

std::unique_ptr<ShardedSampler> MakeSharded(int64_t n, int world, int rank, int64_t local_batch, uint64_t seed = 1,
                                            bool drop_last = true, bool shuffle = true) {
  ShardedSampler::Options o;
  o.dataset_size = n;
  o.world_size = world;
  o.rank = rank;
  o.local_batch = local_batch;
  o.seed = seed;
  o.drop_last = drop_last;
  o.shuffle = shuffle;
  std::unique_ptr<ShardedSampler> s;
  const Status st = ShardedSampler::Create(o, &s);
  EXPECT_TRUE(st.ok()) << st;
  return s;
}

// Drains the rest of the current epoch.
Batches Drain(Sampler* s) {
  Batches out;
  std::vector<int64_t> batch;
  while (s->Next(&batch)) out.push_back(batch);
  EXPECT_TRUE(batch.empty());
  return out;
}

std::vector<int64_t> Flatten(const Batches& batches) {
  std::vector<int64_t> all;
  for (const auto& b : batches) all.insert(all.end(), b.begin(), b.end());
  return all;
}

// Epoch `epoch`'s whole permutation, as the W=1 sampler without drop_last sees it.
std::vector<int64_t> Permutation(int64_t n, uint64_t seed, uint64_t epoch) {
  auto s = MakeSharded(n, 1, 0, n, seed, /*drop_last=*/false);
  s->StartEpoch(epoch);
  std::vector<int64_t> perm;
  EXPECT_TRUE(s->Next(&perm));
  return perm;
}

Status CreateStatus(const ShardedSampler::Options& o) {
  std::unique_ptr<ShardedSampler> s;
  return ShardedSampler::Create(o, &s);
}

TEST(ShardedSamplerTest, RanksAreDisjointAndFollowTheGlobalPermutation) {
  const int64_t n = 1000;
  const int world = 4;
  const int64_t lb = 32;  // global batch 128, 7 full steps, tail of 104 dropped
  std::vector<Batches> per_rank;
  for (int r = 0; r < world; ++r) per_rank.push_back(Drain(MakeSharded(n, world, r, lb).get()));
  const std::vector<int64_t> perm = Permutation(n, 1, 0);
  ASSERT_EQ(perm.size(), 1000u);
  std::set<int64_t> seen;
  for (int r = 0; r < world; ++r) {
    ASSERT_EQ(per_rank[r].size(), 7u);
    for (size_t step = 0; step < 7; ++step) {
      ASSERT_EQ(per_rank[r][step].size(), 32u);
      for (size_t j = 0; j < 32; ++j) {
        EXPECT_EQ(per_rank[r][step][j], perm[step * 128 + r * 32 + j]);
        EXPECT_TRUE(seen.insert(per_rank[r][step][j]).second) << "index read twice";
      }
    }
  }
  EXPECT_EQ(seen.size(), 896u);
  EXPECT_EQ(std::set<int64_t>(perm.begin(), perm.end()).size(), 1000u);
  EXPECT_GE(*seen.begin(), 0);
  EXPECT_LT(*seen.rbegin(), n);
}

TEST(ShardedSamplerTest, DropLastSkipsTheShortTail) {
  auto s = MakeSharded(1000, 4, 0, 32);
  EXPECT_EQ(s->global_batch(), 128);
  EXPECT_EQ(s->batches_per_epoch(), 7);
  EXPECT_EQ(s->epoch_length(), 896);
  const Batches b = Drain(s.get());
  EXPECT_EQ(b.size(), 7u);
  EXPECT_EQ(s->state(), (SamplerState{0, 896}));
  std::vector<int64_t> batch = {1};
  EXPECT_FALSE(s->Next(&batch));
  EXPECT_TRUE(batch.empty());
}

TEST(ShardedSamplerTest, WithoutDropLastTheTailIsSplitEvenlyAndEveryIndexIsVisitedOnce) {
  const int64_t n = 1000;
  std::set<int64_t> seen;
  for (int r = 0; r < 4; ++r) {
    auto s = MakeSharded(n, 4, r, 32, 1, /*drop_last=*/false);
    EXPECT_EQ(s->batches_per_epoch(), 8);
    EXPECT_EQ(s->epoch_length(), 1000);
    const Batches b = Drain(s.get());
    ASSERT_EQ(b.size(), 8u);
    EXPECT_EQ(b.back().size(), 26u);  // tail 104 = 4 x 26
    for (int64_t i : Flatten(b)) EXPECT_TRUE(seen.insert(i).second);
    EXPECT_EQ(s->state(), (SamplerState{0, 1000}));
  }
  EXPECT_EQ(seen.size(), 1000u);
}

TEST(ShardedSamplerTest, TailSmallerThanWorldLeavesSomeRanksEmpty) {
  // n = 10, global batch 8: tail of 2 over 4 ranks -> 1, 1, 0, 0.
  const std::vector<int64_t> perm = Permutation(10, 1, 0);
  const std::vector<size_t> expected_sizes = {1, 1, 0, 0};
  for (int r = 0; r < 4; ++r) {
    auto s = MakeSharded(10, 4, r, 2, 1, /*drop_last=*/false);
    const Batches b = Drain(s.get());
    ASSERT_EQ(b.size(), 2u) << "every rank takes part in the tail step";
    EXPECT_EQ(b[1].size(), expected_sizes[r]);
    if (!b[1].empty()) {
      EXPECT_EQ(b[1][0], perm[8 + r]);
    }
  }
}

TEST(ShardedSamplerTest, SameSeedGivesSameOrderAndOtherSeedsDiffer) {
  EXPECT_EQ(Drain(MakeSharded(500, 2, 1, 10, 7).get()), Drain(MakeSharded(500, 2, 1, 10, 7).get()));
  EXPECT_NE(Drain(MakeSharded(500, 2, 1, 10, 7).get()), Drain(MakeSharded(500, 2, 1, 10, 8).get()));
}

TEST(ShardedSamplerTest, EachEpochHasItsOwnPermutation) {
  auto s = MakeSharded(500, 1, 0, 500);
  const Batches e0 = Drain(s.get());
  s->StartEpoch(1);
  EXPECT_EQ(s->state(), (SamplerState{1, 0}));
  const Batches e1 = Drain(s.get());
  ASSERT_EQ(e0.size(), 1u);
  ASSERT_EQ(e1.size(), 1u);
  EXPECT_NE(e0, e1);
  EXPECT_EQ(std::set<int64_t>(e1[0].begin(), e1[0].end()).size(), 500u);
  s->StartEpoch(0);
  EXPECT_EQ(Drain(s.get()), e0);
}

TEST(ShardedSamplerTest, WithoutShuffleTheOrderIsTheIdentity) {
  auto s = MakeSharded(20, 2, 1, 3, 1, /*drop_last=*/true, /*shuffle=*/false);
  EXPECT_EQ(Drain(s.get()), (Batches{{3, 4, 5}, {9, 10, 11}, {15, 16, 17}}));
}

TEST(ShardedSamplerTest, ResumeMidEpochContinuesExactly) {
  for (int r = 0; r < 3; ++r) {
    auto uninterrupted = MakeSharded(1000, 3, r, 16, 5);
    uninterrupted->StartEpoch(2);
    const Batches full = Drain(uninterrupted.get());

    auto first = MakeSharded(1000, 3, r, 16, 5);
    first->StartEpoch(2);
    std::vector<int64_t> batch;
    for (int i = 0; i < 6; ++i) ASSERT_TRUE(first->Next(&batch));
    const SamplerState saved = first->state();
    EXPECT_EQ(saved, (SamplerState{2, 6 * 48}));

    auto resumed = MakeSharded(1000, 3, r, 16, 5);
    ASSERT_TRUE(resumed->Restore(saved).ok());
    EXPECT_EQ(resumed->state(), saved);
    EXPECT_EQ(Drain(resumed.get()), Batches(full.begin() + 6, full.end()));
  }
}

TEST(ShardedSamplerTest, RestoringAFinishedEpochEndsIt) {
  auto s = MakeSharded(1000, 1, 0, 64, 1, /*drop_last=*/false);
  ASSERT_TRUE(s->Restore({4, 1000}).ok());
  std::vector<int64_t> batch;
  EXPECT_FALSE(s->Next(&batch));
}

TEST(ShardedSamplerTest, ResumeAtAnotherWorldSizeReadsTheRestOfTheEpoch) {
  const int64_t n = 1000;
  // Before: 2 ranks x 24 = 48 per step; checkpoint after 4 steps at position 192.
  auto before = MakeSharded(n, 2, 0, 24, 11);
  before->StartEpoch(3);
  std::vector<int64_t> batch;
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(before->Next(&batch));
  const SamplerState saved = before->state();
  ASSERT_EQ(saved.position, 192u);

  // After: 4 ranks x 16 = 64 per step; epoch length floor(1000/64)*64 = 960.
  std::vector<int64_t> continuation;
  int64_t steps = -1;
  for (int r = 0; r < 4; ++r) {
    auto after = MakeSharded(n, 4, r, 16, 11);
    const Status st = after->Restore(saved);
    ASSERT_TRUE(st.ok()) << st;
    const Batches b = Drain(after.get());
    if (steps < 0) steps = static_cast<int64_t>(b.size());
    EXPECT_EQ(static_cast<int64_t>(b.size()), steps) << "ranks stay in lockstep";
    for (int64_t i : Flatten(b)) continuation.push_back(i);
  }
  EXPECT_EQ(steps, (960 - 192) / 64);
  const std::vector<int64_t> perm = Permutation(n, 11, 3);
  std::vector<int64_t> expected(perm.begin() + 192, perm.begin() + 960);
  std::sort(continuation.begin(), continuation.end());
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(continuation, expected);
}

TEST(ShardedSamplerTest, RestoreOffTheBatchGridContinuesFromThatPosition) {
  // 3 ranks x 20 = 60 per step saved at 180; resumed on 2 ranks x 32 = 64.
  const int64_t n = 1000;
  const SamplerState saved{2, 180};
  std::vector<int64_t> continuation;
  for (int r = 0; r < 2; ++r) {
    auto after = MakeSharded(n, 2, r, 32, 5);
    ASSERT_TRUE(after->Restore(saved).ok());
    for (int64_t i : Flatten(Drain(after.get()))) continuation.push_back(i);
  }
  // (1000 - 180) / 64 = 12 full global batches: positions 180 .. 948.
  ASSERT_EQ(continuation.size(), 12u * 64u);
  const std::vector<int64_t> perm = Permutation(n, 5, 2);
  std::vector<int64_t> expected(perm.begin() + 180, perm.begin() + 180 + 12 * 64);
  std::sort(continuation.begin(), continuation.end());
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(continuation, expected);
}

TEST(ShardedSamplerTest, RestoreRejectsAPositionPastTheEndOfTheDataset) {
  auto s = MakeSharded(1000, 2, 0, 32);
  std::vector<int64_t> batch;
  ASSERT_TRUE(s->Next(&batch));
  const Status st = s->Restore({1, 1024});
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("position 1024 of epoch 1 is past the end of the dataset of 1000 samples"));
  EXPECT_EQ(s->state(), (SamplerState{0, 64})) << "a failed Restore leaves the sampler as it was";
}

TEST(ShardedSamplerTest, BadOptionsAreRejected) {
  ShardedSampler::Options good;
  good.dataset_size = 100;
  good.world_size = 2;
  good.rank = 1;
  good.local_batch = 8;
  EXPECT_TRUE(CreateStatus(good).ok());

  ShardedSampler::Options o = good;
  o.dataset_size = 0;
  EXPECT_THAT(CreateStatus(o).message(), HasSubstr("dataset_size must be >= 1, got 0"));
  o = good;
  o.world_size = 0;
  EXPECT_THAT(CreateStatus(o).message(), HasSubstr("world_size must be >= 1, got 0"));
  o = good;
  o.rank = 2;
  EXPECT_THAT(CreateStatus(o).message(), HasSubstr("rank must be in [0, 1], got 2"));
  o = good;
  o.rank = -1;
  EXPECT_EQ(CreateStatus(o).code(), Status::Code::kInvalidArgument);
  o = good;
  o.local_batch = 0;
  EXPECT_THAT(CreateStatus(o).message(), HasSubstr("local_batch must be >= 1, got 0"));
  o = good;
  o.local_batch = 64;
  EXPECT_THAT(CreateStatus(o).message(),
              HasSubstr("the dataset of 100 samples is smaller than one global batch of 128 (world_size 2 x "
                        "local_batch 64)"));
  o.drop_last = false;
  EXPECT_TRUE(CreateStatus(o).ok()) << "without drop_last a single short step is fine";
}

// ---- PKSampler ----------------------------------------------------------------

// 10 classes of 60 images each, classes interleaved irregularly.
std::vector<int64_t> SyntheticLabels() {
  std::vector<int64_t> labels(600);
  for (int64_t i = 0; i < 600; ++i) labels[i] = (i * 7 + i / 60) % 10;
  return labels;
}

PKSampler::Options PkOptions(int p, int k, int world = 1, int rank = 0, uint64_t seed = 3) {
  PKSampler::Options o;
  o.labels = SyntheticLabels();
  o.num_classes = 10;
  o.p = p;
  o.k = k;
  o.world_size = world;
  o.rank = rank;
  o.seed = seed;
  return o;
}

std::unique_ptr<PKSampler> MakePk(PKSampler::Options o) {
  std::unique_ptr<PKSampler> s;
  const Status st = PKSampler::Create(std::move(o), &s);
  EXPECT_TRUE(st.ok()) << st;
  return s;
}

Status PkCreateStatus(PKSampler::Options o) {
  std::unique_ptr<PKSampler> s;
  return PKSampler::Create(std::move(o), &s);
}

TEST(PKSamplerTest, SyntheticLabelsHave60PerClass) {
  std::map<int64_t, int> counts;
  for (int64_t l : SyntheticLabels()) ++counts[l];
  ASSERT_EQ(counts.size(), 10u);
  for (const auto& [label, count] : counts) EXPECT_EQ(count, 60) << label;
}

TEST(PKSamplerTest, EveryBatchHasPDistinctClassesWithKDistinctImagesEach) {
  const std::vector<int64_t> labels = SyntheticLabels();
  auto s = MakePk(PkOptions(4, 5));
  EXPECT_EQ(s->global_batch(), 20);
  EXPECT_EQ(s->batches_per_epoch(), 30);
  for (uint64_t epoch = 0; epoch < 3; ++epoch) {
    s->StartEpoch(epoch);
    const Batches batches = Drain(s.get());
    ASSERT_EQ(batches.size(), 30u);
    for (const auto& b : batches) {
      ASSERT_EQ(b.size(), 20u);
      std::set<int64_t> classes;
      for (int g = 0; g < 4; ++g) {
        const int64_t c = labels[b[g * 5]];
        for (int j = 0; j < 5; ++j) EXPECT_EQ(labels[b[g * 5 + j]], c) << "group " << g;
        classes.insert(c);
      }
      EXPECT_EQ(classes.size(), 4u);
      EXPECT_EQ(std::set<int64_t>(b.begin(), b.end()).size(), 20u);
    }
  }
}

TEST(PKSamplerTest, NoImageRepeatsWithinAPassOverItsClass) {
  const std::vector<int64_t> labels = SyntheticLabels();
  auto s = MakePk(PkOptions(3, 7));  // a pass over a class of 60: 8 draws of 7
  std::map<int64_t, std::vector<std::vector<int64_t>>> draws;  // class -> its groups, in order
  for (const auto& b : Drain(s.get())) {
    for (int g = 0; g < 3; ++g) draws[labels[b[g * 7]]].emplace_back(b.begin() + g * 7, b.begin() + (g + 1) * 7);
  }
  for (const auto& [c, groups] : draws) {
    for (size_t pass = 0; pass * 8 < groups.size(); ++pass) {
      std::set<int64_t> seen;
      for (size_t d = pass * 8; d < std::min(groups.size(), pass * 8 + 8); ++d) {
        for (int64_t i : groups[d]) EXPECT_TRUE(seen.insert(i).second) << "class " << c << " pass " << pass;
      }
    }
  }
}

TEST(PKSamplerTest, ShardsAreDisjointBalancedAndCoverTheDataset) {
  const std::vector<int64_t> labels = SyntheticLabels();
  std::set<int64_t> all;
  for (int r = 0; r < 3; ++r) {
    auto s = MakePk(PkOptions(2, 4, 3, r));
    const std::vector<int64_t> shard = s->ShardIndices();
    EXPECT_EQ(shard.size(), 200u);
    std::map<int64_t, int> per_class;
    for (int64_t i : shard) {
      EXPECT_TRUE(all.insert(i).second) << "index " << i << " in two shards";
      ++per_class[labels[i]];
    }
    for (const auto& [c, count] : per_class) EXPECT_EQ(count, 20) << "class " << c;
    const std::set<int64_t> mine(shard.begin(), shard.end());
    for (int64_t i : Flatten(Drain(s.get()))) EXPECT_TRUE(mine.count(i)) << "rank " << r << " read " << i;
  }
  EXPECT_EQ(all.size(), 600u);
}

TEST(PKSamplerTest, UnevenClassesAreDealtWithinOne) {
  PKSampler::Options o = PkOptions(2, 3, 4, 0);
  o.labels.resize(599);  // one class now has 59 images
  size_t total = 0;
  for (int r = 0; r < 4; ++r) {
    o.rank = r;
    auto s = MakePk(o);
    const size_t size = s->ShardIndices().size();
    EXPECT_TRUE(size == 149u || size == 150u) << size;
    total += size;
    EXPECT_EQ(s->batches_per_epoch(), 599 / 24);
  }
  EXPECT_EQ(total, 599u);
}

TEST(PKSamplerTest, SameSeedSameBatchesAndOtherSeedsOrEpochsDiffer) {
  const Batches a = Drain(MakePk(PkOptions(4, 5, 2, 1, 9)).get());
  EXPECT_EQ(a, Drain(MakePk(PkOptions(4, 5, 2, 1, 9)).get()));
  EXPECT_NE(a, Drain(MakePk(PkOptions(4, 5, 2, 1, 10)).get()));
  auto s = MakePk(PkOptions(4, 5, 2, 1, 9));
  s->StartEpoch(1);
  EXPECT_NE(a, Drain(s.get()));
}

TEST(PKSamplerTest, ResumeMidEpochContinuesExactly) {
  for (int r = 0; r < 2; ++r) {
    auto uninterrupted = MakePk(PkOptions(3, 4, 2, r));
    uninterrupted->StartEpoch(5);
    const Batches full = Drain(uninterrupted.get());
    ASSERT_EQ(full.size(), 25u);  // 600 / (2 * 3 * 4)

    auto first = MakePk(PkOptions(3, 4, 2, r));
    first->StartEpoch(5);
    std::vector<int64_t> batch;
    for (int i = 0; i < 9; ++i) ASSERT_TRUE(first->Next(&batch));
    const SamplerState saved = first->state();
    EXPECT_EQ(saved, (SamplerState{5, 9 * 24}));

    auto resumed = MakePk(PkOptions(3, 4, 2, r));
    ASSERT_TRUE(resumed->Restore(saved).ok());
    EXPECT_EQ(resumed->state(), saved);
    EXPECT_EQ(Drain(resumed.get()), Batches(full.begin() + 9, full.end()));
  }
}

TEST(PKSamplerTest, ResumeAtAnotherWorldSizeKeepsTheGlobalPosition) {
  auto before = MakePk(PkOptions(2, 3, 2, 0));  // global batch 12
  std::vector<int64_t> batch;
  for (int i = 0; i < 6; ++i) ASSERT_TRUE(before->Next(&batch));
  const SamplerState saved = before->state();
  ASSERT_EQ(saved.position, 72u);
  for (int r = 0; r < 4; ++r) {
    auto after = MakePk(PkOptions(2, 3, 4, r));  // global batch 24, 25 batches per epoch
    const Status st = after->Restore(saved);
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_EQ(after->state(), saved);
    EXPECT_EQ(Drain(after.get()).size(), 25u - 3u);
  }
  auto odd = MakePk(PkOptions(2, 3, 5, 0));  // global batch 30 does not divide 72
  const Status st = odd->Restore({0, 72});
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("position 72 of epoch 0 is not a multiple of the global batch 30 "
                                      "(world_size 5 x p 2 x k 3)"));
}

TEST(PKSamplerTest, RestoreRejectsAPositionPastTheEndOfTheEpoch) {
  auto s = MakePk(PkOptions(2, 5));
  const Status st = s->Restore({0, 610});
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("is past the end of the epoch, which has 600 samples here (60 batches of 10)"));
}

TEST(PKSamplerTest, BadOptionsAreRejectedWithClearMessages) {
  EXPECT_TRUE(PkCreateStatus(PkOptions(10, 60)).ok());
  EXPECT_THAT(PkCreateStatus(PkOptions(11, 2)).message(),
              HasSubstr("p (classes per batch) must be in [1, num_classes = 10], got 11"));
  EXPECT_THAT(PkCreateStatus(PkOptions(0, 2)).message(), HasSubstr("got 0"));
  EXPECT_THAT(PkCreateStatus(PkOptions(2, 0)).message(), HasSubstr("k (images per class) must be >= 1, got 0"));
  EXPECT_THAT(PkCreateStatus(PkOptions(2, 16, 4, 0)).message(),
              HasSubstr("k = 16 images per class, but class 0 has only 15 images in the smallest shard (60 in the "
                        "dataset, split over world_size 4); lower k or world_size"));
  EXPECT_THAT(PkCreateStatus(PkOptions(2, 2, 2, 2)).message(), HasSubstr("rank must be in [0, 1], got 2"));

  PKSampler::Options o = PkOptions(2, 2);
  o.labels[17] = 10;
  EXPECT_THAT(PkCreateStatus(o).message(), HasSubstr("label 10 of index 17 is outside [0, num_classes = 10)"));

  o = PkOptions(2, 2);
  for (auto& l : o.labels) l = l == 4 ? 3 : l;  // class 4 has no images at all
  EXPECT_THAT(PkCreateStatus(o).message(), HasSubstr("class 4 has only 0 images"));

}

}  // namespace
}  // namespace dtrain::data
