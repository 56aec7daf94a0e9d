#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>
#include <vector>

#include "dtrain/models/margin_heads.h"
#include "dtrain/models/triplet.h"

namespace dtrain::models {
namespace {

using ::testing::HasSubstr;

constexpr double kPi = 3.14159265358979323846;

// Unit vector in the plane at `angle` radians from (1, 0).
std::vector<float> Unit(double angle) {
  return {static_cast<float>(std::cos(angle)), static_cast<float>(std::sin(angle))};
}

torch::Tensor Rows(const std::vector<std::vector<float>>& rows) {
  std::vector<float> flat;
  for (const auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
  return torch::tensor(flat).reshape({static_cast<int64_t>(rows.size()), static_cast<int64_t>(rows[0].size())}).clone();
}

torch::Tensor Labels(const std::vector<int64_t>& v) { return torch::tensor(v, torch::kLong); }

std::vector<int64_t> ToVector(const torch::Tensor& t) {
  const torch::Tensor c = t.to(torch::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

std::vector<bool> ToBools(const torch::Tensor& t) {
  std::vector<bool> out;
  for (int64_t v : ToVector(t)) out.push_back(v != 0);
  return out;
}

// Mean cross-entropy of rows of logits, computed by hand.
double CrossEntropy(const std::vector<std::vector<double>>& logits, const std::vector<int64_t>& labels) {
  double total = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    double z = 0;
    for (double l : logits[i]) z += std::exp(l);
    total += -(logits[i][labels[i]] - std::log(z));
  }
  return total / static_cast<double>(logits.size());
}

void ExpectLogits(const torch::Tensor& got, const std::vector<std::vector<double>>& want) {
  ASSERT_EQ(got.size(0), static_cast<int64_t>(want.size()));
  for (size_t i = 0; i < want.size(); ++i) {
    for (size_t j = 0; j < want[i].size(); ++j) {
      EXPECT_NEAR(got[i][j].item<double>(), want[i][j], 1e-4) << "logit [" << i << ", " << j << "]";
    }
  }
}

// ---- ArcFace / CosFace -------------------------------------------------------------

class MarginSoftmaxTest : public ::testing::Test {
 protected:
  // C = 2 classes in D = 2: class 0 along (2, 0) (not unit: the head must
  // normalise it), class 1 along (0, 1).
  static MarginSoftmax Make(MarginKind kind, double s, double m, bool easy = false) {
    MarginSoftmaxOptions o;
    o.kind = kind;
    o.num_classes = 2;
    o.embedding_dim = 2;
    o.scale = s;
    o.margin = m;
    o.easy_margin = easy;
    MarginSoftmax head(o);
    torch::NoGradGuard no_grad;
    head->weight().copy_(torch::tensor({2.0f, 0.0f, 0.0f, 1.0f}).reshape({2, 2}));
    return head;
  }
};

TEST_F(MarginSoftmaxTest, ArcFaceAddsTheAngularMarginToTheTargetOnly) {
  const double s = 16, m = 0.2;
  MarginSoftmax head = Make(MarginKind::kArcFace, s, m);
  // Sample 0: 0.3 rad from class 0 (its label). Sample 1: 1.2 rad from
  // class 0, so pi/2 - 1.2 from class 1 (its label).
  const torch::Tensor x = Rows({Unit(0.3), Unit(1.2)});
  const std::vector<int64_t> y = {0, 1};
  const double theta1 = std::acos(std::sin(1.2));
  const std::vector<std::vector<double>> want = {{s * std::cos(0.3 + m), s * std::sin(0.3)},
                                                 {s * std::cos(1.2), s * std::cos(theta1 + m)}};
  ExpectLogits(head->Logits(x, Labels(y)), want);

  const LossOutput out = head->Compute(x, Labels(y));
  EXPECT_NEAR(out.loss.item<double>(), CrossEntropy(want, y), 1e-4);
  EXPECT_EQ(out.active, 2);
  EXPECT_DOUBLE_EQ(out.active_fraction, 1.0);
  EXPECT_EQ(head->name(), "arcface");
}

TEST_F(MarginSoftmaxTest, ArcFaceUsesTheMonotonicReplacementPastPi) {
  const double s = 10, m = 0.5;
  MarginSoftmax head = Make(MarginKind::kArcFace, s, m);
  // theta = 3.0: theta + m > pi, so the target is cos(theta) - m sin(m).
  // theta = 2.5: theta + m = 3.0 < pi, the ordinary cos(theta + m).
  const torch::Tensor x = Rows({Unit(3.0), Unit(2.5)});
  ASSERT_LT(std::cos(3.0), std::cos(kPi - m));
  ASSERT_GT(std::cos(2.5), std::cos(kPi - m));
  const std::vector<std::vector<double>> want = {{s * (std::cos(3.0) - m * std::sin(m)), s * std::sin(3.0)},
                                                 {s * std::cos(3.0), s * std::sin(2.5)}};
  ExpectLogits(head->Logits(x, Labels({0, 0})), want);
  EXPECT_NEAR(head->Compute(x, Labels({0, 0})).loss.item<double>(), CrossEntropy(want, {0, 0}), 1e-4);
}

TEST_F(MarginSoftmaxTest, ArcFaceEasyMarginSkipsObtuseAngles) {
  const double s = 16, m = 0.2;
  MarginSoftmax head = Make(MarginKind::kArcFace, s, m, /*easy=*/true);
  // theta = 2.0: cos < 0, target left at cos(theta). theta = 0.3: margin applies.
  const torch::Tensor x = Rows({Unit(2.0), Unit(0.3)});
  const std::vector<std::vector<double>> want = {{s * std::cos(2.0), s * std::sin(2.0)},
                                                 {s * std::cos(0.3 + m), s * std::sin(0.3)}};
  ExpectLogits(head->Logits(x, Labels({0, 0})), want);
}

TEST_F(MarginSoftmaxTest, CosFaceSubtractsTheMarginFromTheTargetCosine) {
  const double s = 16, m = 0.2;
  MarginSoftmax head = Make(MarginKind::kCosFace, s, m);
  const torch::Tensor x = Rows({Unit(0.3), Unit(1.2)});
  const std::vector<int64_t> y = {0, 1};
  const std::vector<std::vector<double>> want = {{s * (std::cos(0.3) - m), s * std::sin(0.3)},
                                                 {s * std::cos(1.2), s * (std::sin(1.2) - m)}};
  ExpectLogits(head->Logits(x, Labels(y)), want);
  EXPECT_NEAR(head->Compute(x, Labels(y)).loss.item<double>(), CrossEntropy(want, y), 1e-4);
  EXPECT_EQ(head->name(), "cosface");
}

TEST_F(MarginSoftmaxTest, GradientsReachEmbeddingsAndClassWeightsAndStayFinite) {
  for (MarginKind kind : {MarginKind::kArcFace, MarginKind::kCosFace}) {
    MarginSoftmax head = Make(kind, 16, 0.2);
    // Row 0 coincides with its class (theta = 0, the clamp keeps sin' finite);
    // row 1 is opposite to it (theta = pi).
    const torch::Tensor x = Rows({Unit(0.0), Unit(kPi), Unit(0.7)}).requires_grad_(true);
    const LossOutput out = head->Compute(x, Labels({0, 0, 1}));
    out.loss.backward();
    ASSERT_TRUE(x.grad().defined());
    ASSERT_TRUE(head->weight().grad().defined());
    EXPECT_TRUE(torch::isfinite(x.grad()).all().item<bool>());
    EXPECT_TRUE(torch::isfinite(head->weight().grad()).all().item<bool>());
    EXPECT_GT(head->weight().grad().abs().sum().item<double>(), 0);
    EXPECT_EQ(head->parameters().size(), 1u);
  }
}

TEST_F(MarginSoftmaxTest, BadLabelsAndShapesThrow) {
  MarginSoftmax head = Make(MarginKind::kArcFace, 16, 0.2);
  const torch::Tensor x = Rows({Unit(0.3)});
  EXPECT_THROW(head->Compute(x, Labels({2})), c10::Error);
  EXPECT_THROW(head->Compute(x, Labels({-1})), c10::Error);
  EXPECT_THROW(head->Compute(x, Labels({0, 1})), c10::Error);
  EXPECT_THROW(head->Compute(torch::ones({1, 3}), Labels({0})), c10::Error);
}

TEST(MarginSoftmaxOptionsTest, ValidateNamesTheField) {
  MarginSoftmaxOptions o;
  EXPECT_TRUE(o.Validate().ok());
  o.scale = 0;
  EXPECT_EQ(o.Validate("loss.arcface").message(), "loss.arcface.scale: must be > 0, got 0");
  o.scale = 16;
  o.margin = 2;
  EXPECT_THAT(o.Validate("loss.arcface").message(), HasSubstr("loss.arcface.margin"));
  o.kind = MarginKind::kCosFace;
  o.margin = 0.35;
  EXPECT_TRUE(o.Validate().ok());
}

// ---- triplet: distances ---------------------------------------------------------------

TEST(TripletDistanceTest, L2AndCosineMatchHandValues) {
  // (1, 0), (0, 1), (-1, 0), (0.6, 0.8)
  const torch::Tensor e = Rows({{1, 0}, {0, 1}, {-1, 0}, {0.6f, 0.8f}});
  const torch::Tensor l2 = PairwiseDistance(e, TripletDistance::kL2);
  EXPECT_NEAR(l2[0][1].item<double>(), std::sqrt(2.0), 1e-5);
  EXPECT_NEAR(l2[0][2].item<double>(), 2.0, 1e-5);
  EXPECT_NEAR(l2[0][3].item<double>(), std::sqrt(0.8), 1e-5);
  EXPECT_NEAR(l2[1][3].item<double>(), std::sqrt(0.4), 1e-5);
  EXPECT_TRUE(torch::allclose(l2, l2.t()));
  EXPECT_LT(l2.diagonal().max().item<double>(), 1e-3);

  // Cosine normalises: scaling a row changes nothing.
  const torch::Tensor cosine = PairwiseDistance(e * torch::tensor({3.0f, 1.0f, 0.5f, 2.0f}).unsqueeze(1),
                                                TripletDistance::kCosine);
  EXPECT_NEAR(cosine[0][1].item<double>(), 1.0, 1e-6);
  EXPECT_NEAR(cosine[0][2].item<double>(), 2.0, 1e-6);
  EXPECT_NEAR(cosine[0][3].item<double>(), 0.4, 1e-6);
  EXPECT_NEAR(cosine[1][3].item<double>(), 0.2, 1e-6);
  EXPECT_NEAR(cosine.diagonal().abs().max().item<double>(), 0.0, 1e-6);
}

TEST(TripletDistanceTest, L2GradientIsFiniteForIdenticalEmbeddings) {
  const torch::Tensor e = Rows({{1, 0}, {1, 0}, {0, 1}}).requires_grad_(true);
  PairwiseDistance(e, TripletDistance::kL2).sum().backward();
  EXPECT_TRUE(torch::isfinite(e.grad()).all().item<bool>());
}

// ---- triplet: miners --------------------------------------------------------------------

// 1-D points whose L2 distances are |x_i - x_j|.
torch::Tensor Points(const std::vector<float>& x) { return torch::tensor(x).unsqueeze(1); }

TEST(TripletMiningTest, BatchHardPicksFarthestPositiveAndNearestNegative) {
  // x:      0  1  3  4  10  20
  // label:  0  0  1  1   0   2   (the last one has no positive)
  const torch::Tensor dist = PairwiseDistance(Points({0, 1, 3, 4, 10, 20}), TripletDistance::kL2);
  const BatchHardMining mined = MineBatchHard(dist, Labels({0, 0, 1, 1, 0, 2}));
  const std::vector<bool> valid = ToBools(mined.valid);
  EXPECT_EQ(valid, (std::vector<bool>{true, true, true, true, true, false}));
  const std::vector<int64_t> pos = ToVector(mined.positive), neg = ToVector(mined.negative);
  EXPECT_EQ(std::vector<int64_t>(pos.begin(), pos.begin() + 5), (std::vector<int64_t>{4, 4, 3, 2, 0}));
  EXPECT_EQ(std::vector<int64_t>(neg.begin(), neg.begin() + 5), (std::vector<int64_t>{2, 2, 1, 1, 3}));
}

TEST(TripletMiningTest, BatchHardLossIsTheMeanOverValidAnchors) {
  TripletOptions o;
  o.miner = TripletMiner::kBatchHard;
  o.margin = 0.2;
  TripletLoss loss(o);
  const LossOutput out = loss->Compute(Points({0, 1, 3, 4, 10, 20}), Labels({0, 0, 1, 1, 0, 2}));
  // Per valid anchor relu(d_ap - d_an + 0.2): 10-3, 9-2, 1-2, 1-3, 10-6 (+0.2).
  EXPECT_NEAR(out.loss.item<double>(), (7.2 + 7.2 + 0 + 0 + 4.2) / 5, 1e-4);
  EXPECT_EQ(out.active, 3);
  EXPECT_DOUBLE_EQ(out.active_fraction, 3.0 / 5.0);
}

// x:      0  1  0.5  3  2
// label:  0  0  1    1  0
const std::vector<float> kSemiX = {0, 1, 0.5f, 3, 2};
const std::vector<int64_t> kSemiY = {0, 0, 1, 1, 0};

TEST(TripletMiningTest, SemiHardPicksNearestFartherNegativeOrFallsBackToFarthest) {
  const torch::Tensor dist = PairwiseDistance(Points(kSemiX), TripletDistance::kL2);
  const SemiHardMining mined = MineSemiHard(dist, Labels(kSemiY));
  EXPECT_EQ(ToVector(mined.anchor), (std::vector<int64_t>{0, 0, 1, 1, 2, 3, 4, 4}));
  EXPECT_EQ(ToVector(mined.positive), (std::vector<int64_t>{1, 4, 0, 4, 3, 2, 0, 1}));
  // (2, 3): d_ap = 2.5, every negative is nearer -> farthest, 4 (1.5).
  // (4, 0): d_ap = 2, negatives at 1.5 and 1 -> farthest, 2.
  // (4, 1): d_ap = 1; negative 3 is at exactly 1 (not farther), so 2 (1.5).
  EXPECT_EQ(ToVector(mined.negative), (std::vector<int64_t>{3, 3, 3, 3, 4, 0, 2, 2}));
  EXPECT_EQ(ToBools(mined.fallback), (std::vector<bool>{false, false, false, false, true, false, true, false}));
}

TEST(TripletMiningTest, SemiHardLossIsTheMeanOverPairs) {
  TripletOptions o;
  o.miner = TripletMiner::kSemiHard;
  o.margin = 0.2;
  TripletLoss loss(o);
  const LossOutput out = loss->Compute(Points(kSemiX), Labels(kSemiY));
  // Only (2, 3, 4): 2.5 - 1.5 + 0.2 and (4, 0, 2): 2 - 1.5 + 0.2 are positive.
  EXPECT_NEAR(out.loss.item<double>(), (1.2 + 0.7) / 8, 1e-4);
  EXPECT_EQ(out.active, 2);
  EXPECT_DOUBLE_EQ(out.active_fraction, 2.0 / 8.0);
}

TEST(TripletMiningTest, BatchAllCountsViolatingTripletsAndAveragesThem) {
  TripletOptions o;
  o.miner = TripletMiner::kBatchAll;
  o.margin = 0.2;
  TripletLoss loss(o);
  const LossOutput out = loss->Compute(Points(kSemiX), Labels(kSemiY));
  // Violating triplets (a, p, n): loss
  //   (0,1,2) 0.7  (0,4,2) 1.7  (1,0,2) 0.7  (1,4,2) 0.7
  //   (2,3,0) 2.2  (2,3,1) 2.2  (2,3,4) 1.2  (3,2,1) 0.7  (3,2,4) 1.7
  //   (4,0,2) 0.7  (4,0,3) 1.2  (4,1,3) 0.2
  // out of 4 + 4 + 3 + 3 + 4 = 18 valid triplets.
  const double sum = 0.7 + 1.7 + 0.7 + 0.7 + 2.2 + 2.2 + 1.2 + 0.7 + 1.7 + 0.7 + 1.2 + 0.2;
  EXPECT_EQ(out.active, 12);
  EXPECT_NEAR(out.loss.item<double>(), sum / 12, 1e-4);
  EXPECT_DOUBLE_EQ(out.active_fraction, 12.0 / 18.0);
}

TEST(TripletMiningTest, BatchAllMatchesBruteForceAcrossAnchorChunks) {
  // B = 170: B^3 > 2^22, so the evaluation runs in two chunks of anchors.
  torch::manual_seed(3);
  const int64_t b = 170;
  const torch::Tensor e = torch::nn::functional::normalize(torch::randn({b, 3}));
  const torch::Tensor y = torch::randint(0, 5, {b}, torch::kLong);
  TripletOptions o;
  o.miner = TripletMiner::kBatchAll;
  o.margin = 0.3;
  const LossOutput out = TripletLoss(o)->Compute(e, y);

  const torch::Tensor d = PairwiseDistance(e, TripletDistance::kL2).to(torch::kDouble).contiguous();
  const auto da = d.accessor<double, 2>();
  const auto ya = y.accessor<int64_t, 1>();
  double sum = 0;
  int64_t active = 0, valid = 0;
  for (int64_t a = 0; a < b; ++a) {
    for (int64_t p = 0; p < b; ++p) {
      if (p == a || ya[p] != ya[a]) continue;
      for (int64_t n = 0; n < b; ++n) {
        if (ya[n] == ya[a]) continue;
        ++valid;
        const double l = da[a][p] - da[a][n] + 0.3;
        if (l > 0) {
          sum += l;
          ++active;
        }
      }
    }
  }
  EXPECT_NEAR(static_cast<double>(out.active), static_cast<double>(active), 2);  // float ties at 0
  EXPECT_NEAR(out.loss.item<double>(), sum / static_cast<double>(active), 1e-4);
  EXPECT_NEAR(out.active_fraction, static_cast<double>(active) / static_cast<double>(valid), 1e-4);
}

TEST(TripletMiningTest, BatchesWithoutValidTripletsGiveZeroLossAndFiniteGradient) {
  const std::vector<std::vector<int64_t>> label_sets = {{1, 1, 1, 1}, {0, 1, 2, 3}, {5}};
  for (TripletMiner miner : {TripletMiner::kBatchAll, TripletMiner::kBatchHard, TripletMiner::kSemiHard}) {
    for (TripletDistance distance : {TripletDistance::kL2, TripletDistance::kCosine}) {
      for (const auto& labels : label_sets) {
        TripletOptions o;
        o.miner = miner;
        o.distance = distance;
        const int64_t b = static_cast<int64_t>(labels.size());
        // Includes two identical rows, the worst case for sqrt's gradient.
        torch::Tensor e = torch::nn::functional::normalize(torch::randn({b, 3}));
        if (b > 1) e[1].copy_(e[0]);
        e.requires_grad_(true);
        const LossOutput out = TripletLoss(o)->Compute(e, Labels(labels));
        const std::string what = "miner " + std::to_string(static_cast<int>(miner)) + " distance " +
                                 std::to_string(static_cast<int>(distance)) + " B " + std::to_string(b);
        EXPECT_EQ(out.loss.item<double>(), 0.0) << what;
        EXPECT_EQ(out.active, 0) << what;
        EXPECT_EQ(out.active_fraction, 0.0) << what;
        ASSERT_TRUE(out.loss.requires_grad()) << what;
        out.loss.backward();
        ASSERT_TRUE(e.grad().defined()) << what;
        EXPECT_TRUE(torch::isfinite(e.grad()).all().item<bool>()) << what;
        EXPECT_EQ(e.grad().abs().sum().item<double>(), 0.0) << what;
      }
    }
  }
}

TEST(TripletMiningTest, CosineDistanceBatchHardMatchesHandValues) {
  // Unit vectors at these angles; labels 0, 0, 1, 1.
  const std::vector<double> angle = {0.0, 0.5, 0.3, 2.0};
  auto d = [&](int i, int j) { return 1 - std::cos(angle[i] - angle[j]); };
  TripletOptions o;
  o.miner = TripletMiner::kBatchHard;
  o.distance = TripletDistance::kCosine;
  o.margin = 0.2;
  const torch::Tensor e = Rows({Unit(angle[0]), Unit(angle[1]), Unit(angle[2]), Unit(angle[3])}).requires_grad_(true);
  const LossOutput out = TripletLoss(o)->Compute(e, Labels({0, 0, 1, 1}));
  // Hardest positive / nearest negative per anchor: 0: (1, 2), 1: (0, 2), 2: (3, 1), 3: (2, 1).
  const double want = ((d(0, 1) - d(0, 2) + 0.2) + (d(1, 0) - d(1, 2) + 0.2) + (d(2, 3) - d(2, 1) + 0.2) +
                       (d(3, 2) - d(3, 1) + 0.2)) /
                      4;
  EXPECT_NEAR(out.loss.item<double>(), want, 1e-5);
  EXPECT_EQ(out.active, 4);
  out.loss.backward();
  EXPECT_TRUE(torch::isfinite(e.grad()).all().item<bool>());
}

TEST(TripletOptionsTest, NegativeMarginIsRejected) {
  TripletOptions o;
  EXPECT_TRUE(o.Validate().ok());
  o.margin = -0.1;
  EXPECT_THAT(o.Validate().message(), HasSubstr("loss.triplet.margin: must be >= 0"));
  EXPECT_THROW(TripletLoss{o}, c10::Error);
}

}  // namespace
}  // namespace dtrain::models
