#include "dtrain/worker/trainer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "dtrain/common/config.h"
#include "dtrain/models/registry.h"
#include "dtrain/worker/run_job.h"

namespace dtrain::worker {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("dtrain_trainer_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A small ArcFace job: 12,000 training images, 3 epochs, evaluated on 2,000 test images.
  JobConfig SmokeConfig(const std::vector<std::string>& extra = {}) {
    std::vector<std::string> overrides = {"run_dir=" + dir_.string()};
    overrides.insert(overrides.end(), extra.begin(), extra.end());
    JobConfig config;
    Status st = ParseJobConfig(R"(
        name: "smoke"
        model { widths: [16, 32, 64] embedding_dim: 64 }
        loss { name: "arcface" }
        data { batch_size: 128 train_limit: 12000 test_limit: 2000 }
        optimizer { lr: 0.1 }
        training { epochs: 3 log_every_steps: 10 progress_bar: false }
        eval { batch_size: 500 }
        parallelism { sync {} }
      )",
                               "smoke.textproto", overrides, &config);
    EXPECT_TRUE(st.ok()) << st;
    return config;
  }

  fs::path dir_;
};

std::vector<double> LoggedLosses(const fs::path& metrics) {
  std::vector<double> losses;
  std::ifstream in(metrics);
  std::string line;
  while (std::getline(in, line)) losses.push_back(nlohmann::json::parse(line).at("loss").get<double>());
  return losses;
}

TEST_F(TrainerTest, SmokeTrainingLearnsAndBeatsRawPixels) {
  JobConfig config = SmokeConfig();
  std::unique_ptr<Trainer> trainer;
  ASSERT_TRUE(Trainer::Create(config, std::make_unique<LocalStrategy>(), {}, &trainer).ok());
  TrainResult r;
  Status st = trainer->Run(&r);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(r.steps, 3 * (12000 / 128));
  ASSERT_TRUE(r.evaluated);

  const std::vector<double> losses = LoggedLosses(dir_ / "metrics.jsonl");
  ASSERT_GE(losses.size(), 10u);
  EXPECT_LT(losses.back(), 0.6 * losses.front()) << "the loss must fall during training";

  // Training must beat the raw-pixel baseline on the same queries.
  EXPECT_GT(r.model_metrics.precision_at_1, r.raw_pixel_metrics.precision_at_1 + 0.01)
      << "model " << FormatRetrievalMetrics(r.model_metrics) << "\nraw   "
      << FormatRetrievalMetrics(r.raw_pixel_metrics);
  EXPECT_GT(r.model_metrics.map_at_r, r.raw_pixel_metrics.map_at_r + 0.1);

  // The run directory holds what dtrain eval needs, and eval reproduces the figures.
  for (const char* f : {"config.textproto", "metrics.jsonl", "model.pt", "eval.json"}) {
    EXPECT_TRUE(fs::exists(dir_ / f)) << f;
  }
  const auto eval = nlohmann::json::parse(std::ifstream(dir_ / "eval.json"));
  EXPECT_DOUBLE_EQ(eval.at("model").at("precision_at_1").get<double>(), r.model_metrics.precision_at_1);
  models::Embedder reloaded{nullptr};
  ASSERT_TRUE(models::BuildEmbedder(config.model(), &reloaded).ok());
  ASSERT_TRUE(LoadModel((dir_ / "model.pt").string(), *reloaded).ok());
  RetrievalMetrics again;
  ASSERT_TRUE(EvaluateOnTestSplit(config, *reloaded, &again, nullptr).ok());
  EXPECT_DOUBLE_EQ(again.precision_at_1, r.model_metrics.precision_at_1);
  EXPECT_DOUBLE_EQ(again.map_at_r, r.model_metrics.map_at_r);
}

TEST_F(TrainerTest, TripletWithPKSamplerTrains) {
  JobConfig config = SmokeConfig({"loss.name=triplet", "data.sampler=PK", "data.pk_classes=8", "data.pk_images=8",
                                  "data.batch_size=64", "training.max_steps=30", "eval.at_end=false"});
  std::unique_ptr<Trainer> trainer;
  ASSERT_TRUE(Trainer::Create(config, std::make_unique<LocalStrategy>(), {}, &trainer).ok());
  TrainResult r;
  ASSERT_TRUE(trainer->Run(&r).ok());
  EXPECT_EQ(r.steps, 30);
  EXPECT_FALSE(r.evaluated);
  EXPECT_TRUE(std::isfinite(r.final_loss));
}

TEST_F(TrainerTest, DivergingLossFailsNamingTheStep) {
  JobConfig config = SmokeConfig({"optimizer.lr=1e30", "optimizer.momentum=0", "optimizer.nesterov=false",
                                  "schedule.warmup_fraction=0", "training.max_steps=20"});
  std::unique_ptr<Trainer> trainer;
  ASSERT_TRUE(Trainer::Create(config, std::make_unique<LocalStrategy>(), {}, &trainer).ok());
  Status st = trainer->Run(nullptr);
  EXPECT_EQ(st.code(), Status::Code::kAborted);
  EXPECT_THAT(st.message(), HasSubstr("the loss became"));
  EXPECT_THAT(st.message(), HasSubstr("at step"));
}

TEST_F(TrainerTest, UnknownModelOrLossNameListsKnownNames) {
  std::unique_ptr<Trainer> trainer;
  Status st = Trainer::Create(SmokeConfig({"model.name=resnet9"}), std::make_unique<LocalStrategy>(), {}, &trainer);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("unknown model 'resnet9' (known: resnet_embedder)"));
  st = Trainer::Create(SmokeConfig({"loss.name=contrastive"}), std::make_unique<LocalStrategy>(), {}, &trainer);
  EXPECT_THAT(st.message(), HasSubstr("unknown loss 'contrastive' (known: arcface, cosface, triplet)"));
}

TEST_F(TrainerTest, MissingDatasetIsReported) {
  std::unique_ptr<Trainer> trainer;
  Status st = Trainer::Create(SmokeConfig({"data.dir=/nonexistent/fmnist"}), std::make_unique<LocalStrategy>(), {},
                              &trainer);
  EXPECT_EQ(st.code(), Status::Code::kNotFound);
  EXPECT_THAT(st.message(), HasSubstr("/nonexistent/fmnist"));
}

TEST_F(TrainerTest, ModesNotBuiltYetAreRefusedClearly) {
  Status st = RunJob(SmokeConfig({"launch.workers=2"}), {}, nullptr);
  EXPECT_EQ(st.code(), Status::Code::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr("launch.workers"));
}

TEST_F(TrainerTest, LoadModelReportsMissingAndMismatchedFiles) {
  models::Embedder model{nullptr};
  ASSERT_TRUE(models::BuildEmbedder(SmokeConfig().model(), &model).ok());
  EXPECT_EQ(LoadModel((dir_ / "none.pt").string(), *model).code(), Status::Code::kNotFound);
  fs::create_directories(dir_);
  models::Embedder other{nullptr};
  ModelConfig mc = SmokeConfig().model();
  mc.set_embedding_dim(16);
  ASSERT_TRUE(models::BuildEmbedder(mc, &other).ok());
  ASSERT_TRUE(SaveModel(*other, (dir_ / "other.pt").string()).ok());
  Status st = LoadModel((dir_ / "other.pt").string(), *model);
  EXPECT_EQ(st.code(), Status::Code::kCorruption);
  EXPECT_THAT(st.message(), HasSubstr("other.pt"));
}

}  // namespace
}  // namespace dtrain::worker
