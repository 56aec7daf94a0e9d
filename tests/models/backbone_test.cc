#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "dtrain/models/embedder.h"

namespace dtrain::models {
namespace {

using ::testing::HasSubstr;

// Small enough that a forward and backward take milliseconds.
EmbedderOptions Tiny() {
  EmbedderOptions o;
  o.widths = {4, 8, 16};
  o.embedding_dim = 8;
  return o;
}

torch::Tensor Images(int64_t batch) { return torch::randn({batch, 1, 28, 28}); }

void ExpectUnitRows(const torch::Tensor& out) {
  const torch::Tensor norms = out.norm(2, 1);
  EXPECT_TRUE(torch::allclose(norms, torch::ones_like(norms), /*rtol=*/1e-5, /*atol=*/1e-5)) << norms;
}

TEST(EmbedderTest, OutputIsBatchByDimWithUnitRows) {
  torch::manual_seed(0);
  Embedder model(Tiny());
  const torch::Tensor out = model(Images(4));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{4, 8}));
  ExpectUnitRows(out);
  EXPECT_EQ(model->embedding_dim(), 8);
}

TEST(EmbedderTest, DefaultOptionsGive128DimEmbeddings) {
  torch::manual_seed(0);
  Embedder model;
  model->eval();
  const torch::Tensor out = model(Images(2));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{2, 128}));
  ExpectUnitRows(out);
  EXPECT_EQ(model->layers()->size(), 1u + 3u + 1u);
}

TEST(EmbedderTest, LayerCountIsStemPlusBlocksPlusHead) {
  struct Case {
    std::vector<int64_t> widths;
    int64_t blocks;
  };
  for (const Case& c : {Case{{4}, 1}, Case{{4, 8}, 2}, Case{{4, 8, 16}, 1}, Case{{4, 8, 8, 16}, 3}}) {
    EmbedderOptions o = Tiny();
    o.widths = c.widths;
    o.blocks_per_stage = c.blocks;
    Embedder model(o);
    EXPECT_EQ(model->layers()->size(), static_cast<size_t>(1 + c.widths.size() * c.blocks + 1))
        << "stages " << c.widths.size() << " blocks " << c.blocks;
  }
}

TEST(EmbedderTest, OtherWidthsDepthsAndDimsWork) {
  torch::manual_seed(0);
  EmbedderOptions o;
  o.widths = {4, 8, 8, 16};  // four stages: 28 -> 14 -> 7 -> 4
  o.blocks_per_stage = 2;
  o.embedding_dim = 5;
  o.dropout = 0.3;
  Embedder model(o);
  const torch::Tensor out = model(Images(3));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{3, 5}));
  ExpectUnitRows(out);

  // Non-28 inputs and several input channels work too (global pooling).
  o.in_channels = 3;
  Embedder rgb(o);
  rgb->eval();
  EXPECT_EQ(rgb(torch::randn({1, 3, 32, 32})).sizes(), (std::vector<int64_t>{1, 5}));
}

TEST(EmbedderTest, ProjectionShortcutOnlyWhereShapeChanges) {
  EmbedderOptions o = Tiny();
  o.widths = {4, 4, 8};
  o.blocks_per_stage = 2;
  Embedder model(o);
  std::vector<bool> projections;
  for (const auto& layer : *model->layers()) {
    if (const auto* block = layer.ptr()->as<BasicBlock>()) projections.push_back(block->has_projection());
  }
  // Stage 0 keeps 4 channels; stage 1 strides; stage 2 strides and widens.
  EXPECT_EQ(projections, (std::vector<bool>{false, false, true, false, true, false}));
}

TEST(EmbedderTest, EvalForwardIsDeterministicForAFixedSeed) {
  torch::manual_seed(42);
  Embedder a(Tiny());
  torch::manual_seed(42);
  Embedder b(Tiny());
  a->eval();
  b->eval();
  torch::manual_seed(7);
  const torch::Tensor x = Images(3);
  const torch::Tensor ya = a(x);
  EXPECT_TRUE(torch::equal(ya, b(x)));
  EXPECT_TRUE(torch::equal(ya, a(x)));
  // Eval mode does not depend on the rest of the batch.
  EXPECT_TRUE(torch::allclose(a(x.narrow(0, 0, 1)), ya.narrow(0, 0, 1), 1e-5, 1e-6));
}

TEST(EmbedderTest, BackwardGivesFiniteGradientsToEveryParameter) {
  torch::manual_seed(0);
  EmbedderOptions o = Tiny();
  o.dropout = 0.1;
  Embedder model(o);
  model->train();
  // A loss that is not invariant to the normalisation: pull rows to a target.
  const torch::Tensor target = torch::nn::functional::normalize(torch::randn({4, 8}));
  const torch::Tensor loss = (model(Images(4)) - target).pow(2).sum();
  loss.backward();
  const auto params = model->named_parameters();
  ASSERT_GT(params.size(), 0u);
  for (const auto& p : params) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_TRUE(torch::isfinite(p.value().grad()).all().item<bool>()) << p.key();
  }
  // The expected parameter naming (used by checkpoints and the pipeline cut).
  EXPECT_TRUE(params.contains("layers.0.conv.weight"));
  EXPECT_TRUE(params.contains("layers.2.proj_conv.weight"));
  EXPECT_TRUE(params.contains("layers.4.fc.weight"));
}

TEST(EmbedderTest, ConvolutionsAreKaimingAndBatchNormsIdentity) {
  torch::manual_seed(0);
  EmbedderOptions o = Tiny();
  o.widths = {64};
  Embedder model(o);
  const auto params = model->named_parameters();
  // Kaiming normal, fan_out = 64 * 3 * 3: std = sqrt(2 / 576) ~ 0.0589.
  const double std = params["layers.1.conv1.weight"].std().item<double>();
  EXPECT_NEAR(std, 0.0589, 0.004);
  EXPECT_TRUE(torch::equal(params["layers.1.bn1.weight"], torch::ones({64})));
  EXPECT_TRUE(torch::equal(params["layers.1.bn1.bias"], torch::zeros({64})));
  EXPECT_TRUE(torch::equal(params["layers.2.bn.weight"], torch::ones({8})));
}

TEST(EmbedderTest, SlicedLayersComposeToTheFullForward) {
  torch::manual_seed(0);
  EmbedderOptions o = Tiny();
  o.blocks_per_stage = 2;
  Embedder model(o);
  model->eval();
  const int64_t n = static_cast<int64_t>(model->layers()->size());
  const torch::Tensor x = Images(2);
  const torch::Tensor full = model(x);
  for (int64_t cut = 1; cut < n; ++cut) {
    torch::nn::Sequential first = model->SliceLayers(0, cut);
    torch::nn::Sequential second = model->SliceLayers(cut, n);
    EXPECT_TRUE(torch::allclose(second->forward(first->forward(x)), full, 1e-5, 1e-6)) << "cut " << cut;
  }
  // Slices share the parameters rather than copying them.
  torch::nn::Sequential stem = model->SliceLayers(0, 1);
  EXPECT_EQ(stem->parameters()[0].data_ptr(), model->parameters()[0].data_ptr());
}

TEST(EmbedderTest, InvalidOptionsAreReported) {
  EmbedderOptions o = Tiny();
  EXPECT_TRUE(o.Validate().ok());
  o.widths = {};
  EXPECT_THAT(o.Validate().message(), HasSubstr("model.widths"));
  o = Tiny();
  o.widths = {4, 0};
  EXPECT_EQ(o.Validate().message(), "model.widths[1]: must be >= 1, got 0");
  o = Tiny();
  o.dropout = 1;
  EXPECT_THAT(o.Validate().message(), HasSubstr("model.dropout"));
  o = Tiny();
  o.embedding_dim = 0;
  EXPECT_EQ(o.Validate().code(), Status::Code::kInvalidArgument);
  EXPECT_THROW(Embedder{o}, c10::Error);
}

TEST(EmbedderTest, WrongInputShapeThrows) {
  Embedder model(Tiny());
  EXPECT_THROW(model(torch::randn({2, 3, 28, 28})), c10::Error);
  EXPECT_THROW(model(torch::randn({2, 28, 28})), c10::Error);
}

}  // namespace
}  // namespace dtrain::models
