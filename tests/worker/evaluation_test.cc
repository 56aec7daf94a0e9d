#include "dtrain/worker/evaluation.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace dtrain::worker {
namespace {

namespace F = torch::nn::functional;

TEST(EvaluationTest, ExactNeighborsMatchBruteForce) {
  torch::manual_seed(3);
  torch::Tensor x = F::normalize(torch::randn({300, 8}), F::NormalizeFuncOptions().dim(1));
  NeighborLists nn;
  ASSERT_TRUE(ExactNeighbors(x, x, /*leave_one_out=*/true, 5, &nn).ok());
  ASSERT_EQ(nn.ids.size(), 300u * 5u);
  const torch::Tensor sim_t = torch::mm(x, x.t());
  auto sims = sim_t.accessor<float, 2>();
  for (int64_t q = 0; q < 300; ++q) {
    std::vector<std::pair<float, int64_t>> all;
    for (int64_t j = 0; j < 300; ++j) {
      if (j != q) all.emplace_back(sims[q][j], j);
    }
    std::sort(all.begin(), all.end(), [](auto& a, auto& b) { return a.first > b.first; });
    for (int64_t i = 0; i < 5; ++i) {
      EXPECT_EQ(nn.ids[static_cast<size_t>(q * 5 + i)], all[static_cast<size_t>(i)].second) << "query " << q;
    }
  }
}

TEST(EvaluationTest, SeparatedClustersScorePerfectly) {
  // Three classes on three orthogonal axes, with a little noise.
  torch::manual_seed(4);
  std::vector<int64_t> labels;
  torch::Tensor x = torch::zeros({90, 3});
  for (int64_t i = 0; i < 90; ++i) {
    labels.push_back(i % 3);
    x[i][i % 3] = 1.0;
  }
  x = F::normalize(x + 0.05 * torch::rand({90, 3}), F::NormalizeFuncOptions().dim(1));
  RetrievalMetrics m;
  ASSERT_TRUE(EvaluateEmbeddings(x, labels, {1, 5}, &m).ok());
  EXPECT_EQ(m.queries, 90);
  EXPECT_DOUBLE_EQ(m.precision_at_1, 1.0);
  EXPECT_DOUBLE_EQ(m.map_at_r, 1.0);
}

TEST(EvaluationTest, RawPixelRowsHaveUnitNorm) {
  data::Dataset ds;
  ds.size = 2;
  ds.rows = 2;
  ds.cols = 2;
  ds.images = {0, 3, 4, 0, 1, 1, 1, 1};
  ds.labels = {0, 1};
  torch::Tensor e = RawPixelEmbeddings(ds);
  EXPECT_TRUE(torch::allclose(e[0], torch::tensor({0.0f, 0.6f, 0.8f, 0.0f})));
  EXPECT_TRUE(torch::allclose(e.norm(2, 1), torch::ones({2})));
}

TEST(EvaluationTest, BadShapesAreRejected) {
  NeighborLists nn;
  Status st = ExactNeighbors(torch::zeros({4, 3}), torch::zeros({4, 5}), false, 2, &nn);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  st = ExactNeighbors(torch::zeros({4, 3}), torch::zeros({4, 3}), true, 4, &nn);
  EXPECT_THAT(st.message(), ::testing::HasSubstr("k = 4 must be in [1, 3]"));
}

}  // namespace
}  // namespace dtrain::worker
