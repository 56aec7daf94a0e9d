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
  EXPECT_THAT(st.message(), HasSubstr("unknown model 'resnet9' (known: resnet_embedder"));
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

TEST_F(TrainerTest, ModesThatCannotRunHereAreRefusedClearly) {
  // A pipeline's stages are MPI ranks: without mpirun the error says how to
  // start them; what it cannot do is refused first, naming the field.
  Status st = RunJob(SmokeConfig({"parallelism.pipeline={}", "launch.workers=2"}), {}, nullptr);
  EXPECT_EQ(st.code(), Status::Code::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr("runs its 2 stages as MPI ranks: start it with `dtrain run`"));
  st = RunJob(SmokeConfig({"parallelism.pipeline={}", "launch.workers=2", "optimizer.grad_clip_norm=1"}), {}, nullptr);
  EXPECT_EQ(st.code(), Status::Code::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr("optimizer.grad_clip_norm is not supported with parallelism.pipeline"));
  // Async needs shards: without mpirun and without their addresses, the
  // error says how to start them.
  unsetenv("DTRAIN_PS_ADDRESSES");
  st = RunJob(SmokeConfig({"parallelism.async={}"}), {}, nullptr);
  EXPECT_EQ(st.code(), Status::Code::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr("dtrain run"));
  EXPECT_THAT(st.message(), HasSubstr("DTRAIN_PS_ADDRESSES"));
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
  ASSERT_TRUE(SaveModel(*other, mc, (dir_ / "other.pt").string()).ok());
  Status st = LoadModel((dir_ / "other.pt").string(), *model);
  EXPECT_EQ(st.code(), Status::Code::kCorruption);
  EXPECT_THAT(st.message(), HasSubstr("other.pt"));
  // The file carries its model config, so it alone rebuilds the embedder.
  ModelConfig read;
  ASSERT_TRUE(ReadModelConfig((dir_ / "other.pt").string(), &read).ok());
  EXPECT_EQ(read.embedding_dim(), 16);
  EXPECT_EQ(read.SerializeAsString(), mc.SerializeAsString());
  EXPECT_EQ(ReadModelConfig((dir_ / "none.pt").string(), &read).code(), Status::Code::kNotFound);
}

}  // namespace
}  // namespace dtrain::worker

namespace dtrain::worker {
namespace {

// Every parameter and buffer of the model and the loss, flattened in order.
std::vector<torch::Tensor> AllState(Trainer& t) {
  std::vector<torch::Tensor> out;
  for (const auto& p : t.model()->parameters()) out.push_back(p.detach().clone());
  for (const auto& b : t.model()->buffers()) out.push_back(b.detach().clone());
  for (const auto& p : t.loss()->parameters()) out.push_back(p.detach().clone());
  return out;
}

JobConfig ResumeConfig(const std::string& dir, const std::string& optimizer) {
  JobConfig config;
  Status st = ParseJobConfig(R"(
      name: "resume"
      model { widths: [8, 16] embedding_dim: 16 dropout: 0.1 }
      data { batch_size: 64 train_limit: 2000 }
      training { epochs: 2 threads: 1 log_every_steps: 5 progress_bar: false }
      checkpoint { every_steps: 10 every_epochs: 1 keep_last: 2 async_save: true }
      eval { at_end: false }
    )",
                             "resume.textproto",
                             {"run_dir=" + dir, "optimizer.kind=" + optimizer,
                              optimizer == "ADAMW" ? "optimizer.lr=0.003" : "optimizer.lr=0.1"},
                             &config);
  EXPECT_TRUE(st.ok()) << st;
  return config;
}

class ResumeTest : public ::testing::TestWithParam<const char*> {};

// Interrupted after 25 steps (mid-epoch, 5 steps past the checkpoint at 20),
// resumed, run to the end: the parameters equal an uninterrupted run's bit
// for bit, including SGD momentum / AdamW moments, dropout RNG and sampler.
TEST_P(ResumeTest, ResumedTrainingIsBitwiseIdenticalToUninterrupted) {
  const fs::path root = fs::temp_directory_path() / (std::string("dtrain_resume_") + GetParam());
  fs::remove_all(root);
  TrainerOptions quiet;
  quiet.progress = false;

  std::unique_ptr<Trainer> straight;
  ASSERT_TRUE(Trainer::Create(ResumeConfig((root / "a").string(), GetParam()), std::make_unique<LocalStrategy>(),
                              quiet, &straight)
                  .ok());
  TrainResult ra;
  ASSERT_TRUE(straight->Run(&ra).ok());
  const int64_t total = ra.steps;  // 2 epochs x 31 steps
  ASSERT_EQ(total, 62);

  TrainerOptions interrupted = quiet;
  interrupted.stop_after_steps = 25;
  std::unique_ptr<Trainer> first;
  ASSERT_TRUE(Trainer::Create(ResumeConfig((root / "b").string(), GetParam()), std::make_unique<LocalStrategy>(),
                              interrupted, &first)
                  .ok());
  TrainResult rb;
  ASSERT_TRUE(first->Run(&rb).ok());
  EXPECT_EQ(rb.steps, 25);
  first.reset();

  TrainerOptions resume = quiet;
  resume.resume = true;
  std::unique_ptr<Trainer> second;
  Status st = Trainer::Create(ResumeConfig((root / "b").string(), GetParam()), std::make_unique<LocalStrategy>(),
                              resume, &second);
  ASSERT_TRUE(st.ok()) << st;
  TrainResult rc;
  st = second->Run(&rc);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(rc.resumed_from_step, 20);
  EXPECT_EQ(rc.steps, total);

  const auto a = AllState(*straight);
  const auto b = AllState(*second);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i], b[i])) << "tensor " << i << " differs";
  fs::remove_all(root);
}

INSTANTIATE_TEST_SUITE_P(Optimizers, ResumeTest, ::testing::Values("SGD", "ADAMW"));

TEST(ResumeRefusalTest, CheckpointOfAnotherModelIsRefused) {
  const fs::path root = fs::temp_directory_path() / "dtrain_resume_refusal";
  fs::remove_all(root);
  TrainerOptions o;
  o.progress = false;
  o.stop_after_steps = 10;
  std::unique_ptr<Trainer> t;
  ASSERT_TRUE(Trainer::Create(ResumeConfig(root.string(), "SGD"), std::make_unique<LocalStrategy>(), o, &t).ok());
  ASSERT_TRUE(t->Run(nullptr).ok());
  t.reset();
  JobConfig other = ResumeConfig(root.string(), "SGD");
  other.mutable_model()->set_embedding_dim(32);
  o.resume = true;
  Status st = Trainer::Create(other, std::make_unique<LocalStrategy>(), o, &t);
  EXPECT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("digest"));
  fs::remove_all(root);
}

}  // namespace
}  // namespace dtrain::worker
