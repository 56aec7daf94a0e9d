#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <vector>

#include "dtrain/job.pb.h"
#include "dtrain/models/detector.h"

namespace dtrain::models {
namespace {

using ::testing::HasSubstr;

TEST(DetectorTest, OutputsAreAtStrideFour) {
  torch::manual_seed(0);
  CenterNet net(DetectorOptions{});
  DetectorOutput out = net->forward(torch::rand({2, 1, 128, 96}));
  EXPECT_EQ(out.heatmap.sizes(), (std::vector<int64_t>{2, 4, 32, 24}));
  EXPECT_EQ(out.size.sizes(), (std::vector<int64_t>{2, 2, 32, 24}));
  EXPECT_EQ(out.offset.sizes(), (std::vector<int64_t>{2, 2, 32, 24}));
  // The heatmap starts at the prior sigmoid(-2.19) = 0.1 on average.
  EXPECT_NEAR(torch::sigmoid(out.heatmap).mean().item<double>(), 0.1, 0.08);
}

TEST(DetectorTest, BuildFromConfigChecksFields) {
  ModelConfig mc;
  mc.set_name("centernet_detector");
  CenterNet net{nullptr};
  ASSERT_TRUE(BuildDetector(mc, &net).ok());
  EXPECT_EQ(net->options().num_categories, 4);
  EXPECT_EQ(DetectorCategories(mc), (std::vector<std::string>{"tops", "bottoms", "bags", "footwear"}));
  mc.mutable_detector()->add_widths(8);
  Status st = BuildDetector(mc, &net);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("model.detector.widths: needs 2 to 6 widths, got 1"));
  mc.set_name("resnet_embedder");
  EXPECT_THAT(BuildDetector(mc, &net).message(), HasSubstr("is not a detector"));
}

// A hand-made 1-image, 3-category, 32x32 output: a peak of 0.9 for category
// 0 at row 5, column 7 with a 0.8 neighbour (not a peak: its 3x3
// neighbourhood holds the 0.9), a peak of 0.6 for category 2 at row 20,
// column 10, and a 0.02 peak under the threshold.
TEST(DetectorTest, DecodePicksThreeByThreePeaksAboveThreshold) {
  torch::Tensor heat = torch::zeros({1, 3, 32, 32});
  torch::Tensor size = torch::zeros({1, 2, 32, 32});
  torch::Tensor offset = torch::zeros({1, 2, 32, 32});
  heat[0][0][5][7] = 0.9;
  heat[0][0][5][8] = 0.8;
  heat[0][2][20][10] = 0.6;
  heat[0][1][30][30] = 0.02;
  size[0][0][5][7] = 3;  // width in cells: 12 px
  size[0][1][5][7] = 4;  // height: 16 px
  offset[0][0][5][7] = 0.5;
  offset[0][1][5][7] = 0.25;
  size[0][0][20][10] = 2;
  size[0][1][20][10] = 2;
  auto found = DecodeHeatmaps(heat, size, offset, /*top_k=*/10, /*threshold=*/0.1f);
  ASSERT_EQ(found.size(), 1u);
  ASSERT_EQ(found[0].size(), 2u);
  const DetectorBox& a = found[0][0];
  // Centre ((7 + 0.5) * 4, (5 + 0.25) * 4) = (30, 21), 12 x 16 px.
  EXPECT_EQ(a.category, 0);
  EXPECT_FLOAT_EQ(a.score, 0.9f);
  EXPECT_FLOAT_EQ(a.x0, 24);
  EXPECT_FLOAT_EQ(a.y0, 13);
  EXPECT_FLOAT_EQ(a.x1, 36);
  EXPECT_FLOAT_EQ(a.y1, 29);
  const DetectorBox& b = found[0][1];
  EXPECT_EQ(b.category, 2);
  EXPECT_FLOAT_EQ(b.score, 0.6f);
  EXPECT_FLOAT_EQ(b.x0, 36);  // centre (40, 80), 8 x 8 px
  EXPECT_FLOAT_EQ(b.y0, 76);
  // top_k = 1 keeps the best one only.
  EXPECT_EQ(DecodeHeatmaps(heat, size, offset, 1, 0.1f)[0].size(), 1u);
}

TEST(DetectorTest, TargetsPlaceCentreSizeAndOffset) {
  // A 32 x 16 px box centred at (24, 16) px = cell (6, 4), no offset; and a
  // box centred at (13, 10) px = (3.25, 2.5) cells.
  auto t = BuildDetectorTargets({{{8, 8, 40, 24, 1, 1}, {11, 7, 15, 13, 3, 1}}}, 4, 32, 32);
  EXPECT_FLOAT_EQ(t.heatmap[0][1][4][6].item<float>(), 1.0f);
  EXPECT_FLOAT_EQ(t.heatmap[0][3][2][3].item<float>(), 1.0f);
  EXPECT_EQ(t.heatmap.eq(1.0f).sum().item<int64_t>(), 2);
  EXPECT_FLOAT_EQ(t.mask.sum().item<float>(), 2.0f);
  EXPECT_EQ(t.index[0][0].item<int64_t>(), 4 * 32 + 6);
  EXPECT_FLOAT_EQ(t.size[0][0][0].item<float>(), 8.0f);
  EXPECT_FLOAT_EQ(t.size[0][0][1].item<float>(), 4.0f);
  EXPECT_FLOAT_EQ(t.offset[0][1][0].item<float>(), 0.25f);
  EXPECT_FLOAT_EQ(t.offset[0][1][1].item<float>(), 0.5f);
  // The 8 x 4-cell box has radius round(GaussianRadius(4, 8)) = round(0.76) = 1: its
  // neighbours are between 0 and 1.
  const float n = t.heatmap[0][1][4][7].item<float>();
  EXPECT_GT(n, 0.0f);
  EXPECT_LT(n, 1.0f);
}

TEST(DetectorTest, GaussianRadiusIsTheSmallestOfTheThreeCases) {
  // 7 x 7 cells at IoU 0.5: shrinking binds, 4r^2 - 28r + 24.5 = 0 gives
  // r = (28 - sqrt(392)) / 8 = 1.025.
  EXPECT_NEAR(GaussianRadius(7, 7, 0.5f), 1.025f, 1e-3f);
  EXPECT_LT(GaussianRadius(4, 4), GaussianRadius(8, 8));
  EXPECT_GE(GaussianRadius(0.5f, 0.5f), 0.0f);
}

TEST(DetectorTest, TargetsDecodeBackToTheirBoxes) {
  const std::vector<DetectorBox> boxes = {{10, 12, 38, 30, 0, 1}, {60, 40, 101, 95, 2, 1}};
  auto t = BuildDetectorTargets({boxes}, 3, 32, 32);
  // Dense size/offset maps holding the targets at their cells.
  torch::Tensor size = torch::zeros({1, 2, 32 * 32});
  torch::Tensor offset = torch::zeros({1, 2, 32 * 32});
  for (int k = 0; k < 2; ++k) {
    const int64_t cell = t.index[0][k].item<int64_t>();
    for (int c = 0; c < 2; ++c) {
      size[0][c][cell] = t.size[0][k][c];
      offset[0][c][cell] = t.offset[0][k][c];
    }
  }
  auto found = DecodeHeatmaps(t.heatmap, size.reshape({1, 2, 32, 32}), offset.reshape({1, 2, 32, 32}), 10, 0.99f);
  ASSERT_EQ(found[0].size(), 2u);
  for (const DetectorBox& d : found[0]) {
    const DetectorBox& want = d.category == 0 ? boxes[0] : boxes[1];
    EXPECT_NEAR(d.x0, want.x0, 1e-4);
    EXPECT_NEAR(d.y0, want.y0, 1e-4);
    EXPECT_NEAR(d.x1, want.x1, 1e-4);
    EXPECT_NEAR(d.y1, want.y1, 1e-4);
  }
}

TEST(DetectorTest, LossIsLowForTheTargetsAndFallsWhenFitting) {
  torch::manual_seed(3);
  auto t = BuildDetectorTargets({{{20, 20, 60, 52, 1, 1}}, {{64, 8, 100, 40, 0, 1}}}, 2, 32, 32);
  // Near-perfect logits score far below the prior.
  DetectorOutput perfect{torch::logit(t.heatmap.clamp(1e-4, 1 - 1e-4)), torch::zeros({2, 2, 32, 32}),
                         torch::zeros({2, 2, 32, 32})};
  DetectorOutput prior{torch::full({2, 2, 32, 32}, -2.19), torch::zeros({2, 2, 32, 32}), torch::zeros({2, 2, 32, 32})};
  EXPECT_LT(ComputeDetectorLoss(perfect, t, 0, 0).heatmap, 0.1 * ComputeDetectorLoss(prior, t, 0, 0).heatmap);
  // A few Adam steps of a tiny detector on two images lower every part.
  DetectorOptions o;
  o.num_categories = 2;
  o.widths = {8, 16};
  o.head_width = 16;
  CenterNet net(o);
  torch::Tensor images = torch::zeros({2, 1, 128, 128});
  images.index_put_({0, 0, torch::indexing::Slice(20, 52), torch::indexing::Slice(20, 60)}, 1.0);
  images.index_put_({1, 0, torch::indexing::Slice(8, 40), torch::indexing::Slice(64, 100)}, 0.7);
  torch::optim::Adam opt(net->parameters(), torch::optim::AdamOptions(1e-2));
  const DetectorLoss first = ComputeDetectorLoss(net->forward(images), t, 0.1f, 1.0f);
  DetectorLoss last;
  for (int i = 0; i < 60; ++i) {
    opt.zero_grad();
    last = ComputeDetectorLoss(net->forward(images), t, 0.1f, 1.0f);
    last.total.backward();
    opt.step();
  }
  EXPECT_LT(last.heatmap, 0.5 * first.heatmap);
  EXPECT_LT(last.size, 0.5 * first.size);
}

}  // namespace
}  // namespace dtrain::models
