#include "dtrain/models/registry.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/job.pb.h"
#include "dtrain/models/margin_heads.h"
#include "dtrain/models/triplet.h"

namespace dtrain::models {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

ModelConfig TinyModel() {
  ModelConfig c;
  c.set_embedding_dim(8);
  c.add_widths(4);
  c.add_widths(8);
  return c;
}

TEST(RegistryTest, ListsKnownNames) {
  EXPECT_THAT(ModelNames(), ElementsAre("resnet_embedder"));
  EXPECT_THAT(LossNames(), ElementsAre("arcface", "cosface", "triplet"));
}

TEST(RegistryTest, BuildsTheEmbedderFromConfig) {
  ModelConfig c = TinyModel();
  c.set_blocks_per_stage(2);
  c.set_dropout(0.25f);
  Embedder model{nullptr};
  ASSERT_TRUE(BuildEmbedder(c, &model).ok());
  ASSERT_FALSE(model.is_empty());
  EXPECT_EQ(model->embedding_dim(), 8);
  EXPECT_EQ(model->layers()->size(), 1u + 2u * 2u + 1u);
  EXPECT_NEAR(model->options().dropout, 0.25, 1e-6);
  model->eval();
  EXPECT_EQ(model(torch::randn({2, 1, 28, 28})).sizes(), (std::vector<int64_t>{2, 8}));
}

TEST(RegistryTest, EmptyWidthsMeanTheDefaultStages) {
  EmbedderOptions options;
  ASSERT_TRUE(ToEmbedderOptions(ModelConfig(), &options).ok());
  EXPECT_EQ(options.widths, (std::vector<int64_t>{32, 64, 128}));
  EXPECT_EQ(options.embedding_dim, 128);
  EXPECT_EQ(options.blocks_per_stage, 1);
}

TEST(RegistryTest, UnknownModelNameListsKnownNames) {
  ModelConfig c = TinyModel();
  c.set_name("resnet9");
  Embedder model{nullptr};
  const Status st = BuildEmbedder(c, &model);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(st.message(), "model.name: unknown model 'resnet9' (known: resnet_embedder)");
  EXPECT_TRUE(model.is_empty());
}

TEST(RegistryTest, BadModelFieldIsNamed) {
  ModelConfig c = TinyModel();
  c.set_widths(1, 0);
  Embedder model{nullptr};
  EXPECT_EQ(BuildEmbedder(c, &model).message(), "model.widths[1]: must be >= 1, got 0");
  c = TinyModel();
  c.set_embedding_dim(0);
  EXPECT_THAT(BuildEmbedder(c, &model).message(), HasSubstr("model.embedding_dim"));
  EXPECT_TRUE(model.is_empty());
}

TEST(RegistryTest, BuildsEachLoss) {
  for (const std::string& name : LossNames()) {
    LossConfig c;
    c.set_name(name);
    std::shared_ptr<LossModuleImpl> loss;
    ASSERT_TRUE(BuildLoss(c, /*embedding_dim=*/4, /*num_classes=*/3, &loss).ok()) << name;
    ASSERT_NE(loss, nullptr);
    EXPECT_EQ(loss->name(), name);
    const torch::Tensor e = torch::nn::functional::normalize(torch::randn({6, 4}));
    const LossOutput out = loss->Compute(e, torch::tensor({0, 0, 1, 1, 2, 2}, torch::kLong));
    EXPECT_TRUE(std::isfinite(out.loss.item<double>())) << name;
  }
}

TEST(RegistryTest, MarginHeadsOwnClassWeightsAndTakeTheirSubMessage) {
  LossConfig c;
  c.set_name("cosface");
  c.mutable_cosface()->set_scale(30);
  c.mutable_cosface()->set_margin(0.35f);
  c.mutable_arcface()->set_scale(-1);  // not the selected loss: ignored
  std::shared_ptr<LossModuleImpl> loss;
  ASSERT_TRUE(BuildLoss(c, 16, 10, &loss).ok());
  auto* head = dynamic_cast<MarginSoftmaxImpl*>(loss.get());
  ASSERT_NE(head, nullptr);
  EXPECT_EQ(head->options().kind, MarginKind::kCosFace);
  EXPECT_DOUBLE_EQ(head->options().scale, 30);
  EXPECT_NEAR(head->options().margin, 0.35, 1e-6);
  ASSERT_EQ(loss->parameters().size(), 1u);
  EXPECT_EQ(loss->parameters()[0].sizes(), (std::vector<int64_t>{10, 16}));

  // ArcFace with the proto defaults: s = 16, m = 0.2.
  c.set_name("arcface");
  c.clear_arcface();
  ASSERT_TRUE(BuildLoss(c, 16, 10, &loss).ok());
  head = dynamic_cast<MarginSoftmaxImpl*>(loss.get());
  ASSERT_NE(head, nullptr);
  EXPECT_EQ(head->options().kind, MarginKind::kArcFace);
  EXPECT_DOUBLE_EQ(head->options().scale, 16);
  EXPECT_NEAR(head->options().margin, 0.2, 1e-6);
  EXPECT_FALSE(head->options().easy_margin);
}

TEST(RegistryTest, TripletTakesItsSubMessageAndHasNoParameters) {
  LossConfig c;
  c.set_name("triplet");
  c.mutable_triplet()->set_miner(TripletConfig::BATCH_HARD);
  c.mutable_triplet()->set_distance(TripletConfig::COSINE);
  c.mutable_triplet()->set_margin(0.5f);
  std::shared_ptr<LossModuleImpl> loss;
  ASSERT_TRUE(BuildLoss(c, 16, 10, &loss).ok());
  auto* triplet = dynamic_cast<TripletLossImpl*>(loss.get());
  ASSERT_NE(triplet, nullptr);
  EXPECT_EQ(triplet->options().miner, TripletMiner::kBatchHard);
  EXPECT_EQ(triplet->options().distance, TripletDistance::kCosine);
  EXPECT_NEAR(triplet->options().margin, 0.5, 1e-6);
  EXPECT_TRUE(loss->parameters().empty());

  // Proto default miner: SEMI_HARD, distance L2.
  c.clear_triplet();
  ASSERT_TRUE(BuildLoss(c, 16, 10, &loss).ok());
  triplet = dynamic_cast<TripletLossImpl*>(loss.get());
  ASSERT_NE(triplet, nullptr);
  EXPECT_EQ(triplet->options().miner, TripletMiner::kSemiHard);
  EXPECT_EQ(triplet->options().distance, TripletDistance::kL2);
}

TEST(RegistryTest, UnknownLossNameListsKnownNames) {
  LossConfig c;
  c.set_name("foo");
  std::shared_ptr<LossModuleImpl> loss;
  const Status st = BuildLoss(c, 16, 10, &loss);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(st.message(), "loss.name: unknown loss 'foo' (known: arcface, cosface, triplet)");
  EXPECT_EQ(loss, nullptr);
}

TEST(RegistryTest, BadLossValuesAreNamed) {
  LossConfig c;
  c.set_name("arcface");
  c.mutable_arcface()->set_scale(0);
  std::shared_ptr<LossModuleImpl> loss;
  EXPECT_EQ(BuildLoss(c, 16, 10, &loss).message(), "loss.arcface.scale: must be > 0, got 0");
  c.mutable_arcface()->set_scale(16);
  EXPECT_THAT(BuildLoss(c, 16, 0, &loss).message(), HasSubstr("num_classes"));
  c.set_name("triplet");
  c.mutable_triplet()->set_margin(-1);
  EXPECT_THAT(BuildLoss(c, 16, 10, &loss).message(), HasSubstr("loss.triplet.margin"));
  EXPECT_EQ(loss, nullptr);
}

}  // namespace
}  // namespace dtrain::models
