#include "dtrain/common/detection_metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace dtrain {
namespace {

using ::testing::HasSubstr;

// Two boxes of image 1, category 0: A = [0,10)x[0,10), B = [20,30)x[0,10).
const DetBox kA{0, 0, 10, 10};
const DetBox kB{20, 0, 30, 10};

std::vector<GroundTruthBox> TwoBoxes(int category = 0) {
  return {{1, category, kA}, {1, category, kB}};
}

TEST(BoxIoUTest, HandWorkedCases) {
  EXPECT_DOUBLE_EQ(BoxIoU(kA, kA), 1.0);
  EXPECT_DOUBLE_EQ(BoxIoU(kA, kB), 0.0);
  // x1 is exclusive: [0,10) and [10,20) share no pixel.
  EXPECT_DOUBLE_EQ(BoxIoU(kA, DetBox{10, 0, 20, 10}), 0.0);
  // Half shifted: intersection 5x10 = 50, union 100 + 100 - 50 = 150.
  EXPECT_DOUBLE_EQ(BoxIoU(kA, DetBox{5, 0, 15, 10}), 1.0 / 3.0);
  // Contained: 25 / 100.
  EXPECT_DOUBLE_EQ(BoxIoU(kA, DetBox{0, 0, 5, 5}), 0.25);
  EXPECT_DOUBLE_EQ(BoxIoU(DetBox{0, 0, 5, 5}, kA), 0.25);
  // Empty boxes.
  EXPECT_DOUBLE_EQ(BoxIoU(kA, DetBox{3, 3, 3, 8}), 0.0);
  EXPECT_DOUBLE_EQ(BoxIoU(DetBox{4, 4, 2, 2}, DetBox{4, 4, 2, 2}), 0.0);
}

TEST(AveragePrecisionTest, PerfectDetectionsScoreOne) {
  const std::vector<ScoredDetection> dets = {{1, 0, kA, 0.9f}, {1, 0, kB, 0.8f}};
  EXPECT_DOUBLE_EQ(AveragePrecision(dets, TwoBoxes(), 0, 0.5), 1.0);
  EXPECT_DOUBLE_EQ(AveragePrecision(dets, TwoBoxes(), 0, 0.95), 1.0);
}

TEST(AveragePrecisionTest, OneMissedBoxOfTwo) {
  // One TP: recall 1/2 with precision 1. The recall points 0, 0.01, ..., 0.50
  // (51 of 101) get precision 1, the other 50 are never reached: 51/101.
  const std::vector<ScoredDetection> dets = {{1, 0, kA, 0.9f}};
  EXPECT_DOUBLE_EQ(AveragePrecision(dets, TwoBoxes(), 0, 0.5), 51.0 / 101.0);
}

TEST(AveragePrecisionTest, DuplicateScoringLowestCostsNothing) {
  // Ranking A (TP), B (TP), A again (FP: A is taken): recall 1/2, 1, 1 at
  // precision 1, 1, 2/3. Every recall point is reached by rank 2 at
  // precision 1: AP 1.
  const std::vector<ScoredDetection> dets = {{1, 0, kA, 0.9f}, {1, 0, kB, 0.8f}, {1, 0, kA, 0.7f}};
  EXPECT_DOUBLE_EQ(AveragePrecision(dets, TwoBoxes(), 0, 0.5), 1.0);
}

TEST(AveragePrecisionTest, DuplicateScoringAboveATruePositive) {
  // Ranking A (TP), A again (FP), B (TP): recall 1/2, 1/2, 1; precision 1,
  // 1/2, 2/3, made monotone from the right: 1, 2/3, 2/3. Recall points
  // 0..0.50 (51) take 1, 0.51..1 (50) take 2/3:
  // AP = (51 + 50 * 2/3) / 101 = (153 + 100) / 303 = 253/303.
  const std::vector<ScoredDetection> dets = {{1, 0, kA, 0.9f}, {1, 0, kA, 0.8f}, {1, 0, kB, 0.7f}};
  EXPECT_NEAR(AveragePrecision(dets, TwoBoxes(), 0, 0.5), 253.0 / 303.0, 1e-12);  // a sum of 101 terms
}

TEST(AveragePrecisionTest, FalsePositiveInAnotherImageRanksFirst) {
  // Ranking: a box in image 2 (no truth there: FP), then A (TP). Recall 0,
  // 1 with precision 0, 1/2; monotone 1/2, 1/2: every point 1/2.
  const std::vector<GroundTruthBox> truth = {{1, 0, kA}};
  const std::vector<ScoredDetection> dets = {{2, 0, kA, 0.9f}, {1, 0, kA, 0.5f}};
  EXPECT_DOUBLE_EQ(AveragePrecision(dets, truth, 0, 0.5), 0.5);
}

TEST(AveragePrecisionTest, LowIoUCountsAtHalfButNotAtThreeQuarters) {
  // [0,10)x[0,6.8) inside A: IoU 68/100 = 0.68.
  const std::vector<GroundTruthBox> truth = {{1, 0, kA}};
  const std::vector<ScoredDetection> dets = {{1, 0, DetBox{0, 0, 10, 6.8f}, 0.9f}};
  EXPECT_DOUBLE_EQ(AveragePrecision(dets, truth, 0, 0.5), 1.0);
  EXPECT_DOUBLE_EQ(AveragePrecision(dets, truth, 0, 0.75), 0.0);
  // COCO AP: a hit at 0.50, 0.55, 0.60, 0.65, a miss at 0.70 ... 0.95: 4/10.
  const DetectionMetrics m = EvaluateDetections(dets, truth, {"tops"}, 1);
  EXPECT_DOUBLE_EQ(m.ap50[0], 1.0);
  EXPECT_DOUBLE_EQ(m.ap75[0], 0.0);
  EXPECT_DOUBLE_EQ(m.ap[0], 0.4);
}

TEST(AveragePrecisionTest, MatchesTheUnmatchedTruthOfHighestIoU) {
  // Two overlapping truths A and C = [2,12)x[0,10) (IoU 80/120). The first
  // detection is exactly C: it takes C (IoU 1), not A (IoU 2/3), so the
  // second, exactly A, still finds A: both TP at 0.75.
  const DetBox c{2, 0, 12, 10};
  const std::vector<GroundTruthBox> truth = {{1, 0, kA}, {1, 0, c}};
  const std::vector<ScoredDetection> dets = {{1, 0, c, 0.9f}, {1, 0, kA, 0.8f}};
  EXPECT_DOUBLE_EQ(AveragePrecision(dets, truth, 0, 0.75), 1.0);
}

TEST(AveragePrecisionTest, OtherCategoriesAreIgnored) {
  std::vector<GroundTruthBox> truth = TwoBoxes(0);
  truth.push_back({1, 1, kA});
  // A category-1 detection on A does not take category 0's A.
  const std::vector<ScoredDetection> dets = {{1, 1, kB, 0.99f}, {1, 0, kA, 0.9f}, {1, 0, kB, 0.8f}};
  EXPECT_DOUBLE_EQ(AveragePrecision(dets, truth, 0, 0.5), 1.0);
  // Category 1: its only detection misses: AP 0.
  EXPECT_DOUBLE_EQ(AveragePrecision(dets, truth, 1, 0.5), 0.0);
  // No truth at all: -1.
  EXPECT_DOUBLE_EQ(AveragePrecision(dets, truth, 2, 0.5), -1.0);
}

TEST(EvaluateDetectionsTest, MeanOverCategoriesWithGroundTruth) {
  // Category 0 (tops): both boxes found, AP 1 at every threshold. Category 1
  // (bags): one of two found, 51/101 at every threshold. Category 2
  // (footwear): a detection but no truth: -1, left out of the means.
  std::vector<GroundTruthBox> truth = TwoBoxes(0);
  for (const GroundTruthBox& g : TwoBoxes(1)) truth.push_back({2, g.category, g.box});
  const std::vector<ScoredDetection> dets = {
      {1, 0, kA, 0.9f}, {1, 0, kB, 0.8f}, {2, 1, kA, 0.7f}, {2, 2, kB, 0.6f}};
  const DetectionMetrics m = EvaluateDetections(dets, truth, {"tops", "bags", "footwear"}, 2);
  ASSERT_EQ(m.ap50.size(), 3u);
  EXPECT_DOUBLE_EQ(m.ap50[0], 1.0);
  EXPECT_DOUBLE_EQ(m.ap50[1], 51.0 / 101.0);
  EXPECT_DOUBLE_EQ(m.ap50[2], -1.0);
  EXPECT_DOUBLE_EQ(m.ap75[1], 51.0 / 101.0);
  EXPECT_DOUBLE_EQ(m.ap[0], 1.0);
  EXPECT_DOUBLE_EQ(m.ap[1], 51.0 / 101.0);
  EXPECT_DOUBLE_EQ(m.ap[2], -1.0);
  // (1 + 51/101) / 2 = 152/202 = 76/101.
  EXPECT_DOUBLE_EQ(m.mean_ap50, 76.0 / 101.0);
  EXPECT_DOUBLE_EQ(m.mean_ap75, 76.0 / 101.0);
  EXPECT_DOUBLE_EQ(m.mean_ap, 76.0 / 101.0);
  EXPECT_EQ(m.ground_truth, (std::vector<int64_t>{2, 2, 0}));
  EXPECT_EQ(m.detections, (std::vector<int64_t>{2, 1, 1}));
  EXPECT_EQ(m.images, 2);

  const std::string table = DetectionTable(m);
  EXPECT_THAT(table, HasSubstr("AP50"));
  EXPECT_THAT(table, HasSubstr("tops                      2          2   1.0000   1.0000   1.0000"));
  EXPECT_THAT(table, HasSubstr("footwear                  0          1        -        -        -"));
  EXPECT_THAT(table, HasSubstr("mean                      4          4   0.7525   0.7525   0.7525"));
}

TEST(EvaluateDetectionsTest, NoGroundTruthAnywhereGivesMinusOne) {
  const DetectionMetrics m = EvaluateDetections({{1, 0, kA, 0.5f}}, {}, {"tops"}, 1);
  EXPECT_DOUBLE_EQ(m.ap50[0], -1.0);
  EXPECT_DOUBLE_EQ(m.mean_ap50, -1.0);
  EXPECT_DOUBLE_EQ(m.mean_ap, -1.0);
}

}  // namespace
}  // namespace dtrain
