// The detector trained through the worker's loop: it learns, it resumes
// exactly, and its inputs are checked.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "dtrain/common/config.h"
#include "dtrain/worker/detector_trainer.h"

namespace dtrain::worker {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class DetectorJobTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dtrain_detector_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A tiny detector on 64 x 64 snaps of 1-3 items: 100 steps of 16 snaps (about
  // 6 s on one core; AP50 about 0.85).
  JobConfig TinyConfig(const std::string& run_dir, const std::vector<std::string>& extra = {}) {
    std::vector<std::string> overrides = {"run_dir=" + run_dir};
    overrides.insert(overrides.end(), extra.begin(), extra.end());
    JobConfig config;
    Status st = ParseJobConfig(R"(
        name: "tiny_detector"
        model { name: "centernet_detector" detector { widths: [16, 32, 32] head_width: 16 } }
        data {
          dataset: "fashion_mnist_snaps" batch_size: 16 train_limit: 3000 test_limit: 1000
          snaps { canvas: 64 min_items: 1 max_items: 3 max_scale: 1.2 train_count: 1600 eval_count: 60 }
        }
        optimizer { kind: ADAMW lr: 4e-3 weight_decay: 0 }
        schedule { kind: CONSTANT }
        training { epochs: 1 log_every_steps: 5 progress_bar: false threads: 1 }
        checkpoint { every_steps: 10 }
        parallelism { sync {} }
      )",
                               "tiny_detector.textproto", overrides, &config);
    EXPECT_TRUE(st.ok()) << st;
    return config;
  }

  fs::path dir_;
};

TrainerOptions Quiet() {
  TrainerOptions o;
  o.progress = false;
  return o;
}

TEST_F(DetectorJobTest, TrainingBeatsTheUntrainedDetectorByAWideMargin) {
  const JobConfig config = TinyConfig(dir_.string());
  std::vector<data::Snap> eval;
  ASSERT_TRUE(LoadEvalSnaps(config, &eval).ok());
  ASSERT_EQ(eval.size(), 60u);
  torch::manual_seed(1);
  models::CenterNet untrained{nullptr};
  ASSERT_TRUE(models::BuildDetector(config.model(), &untrained).ok());
  const DetectionMetrics before = EvaluateDetector(*untrained, models::DetectorCategories(config.model()), eval, 20);

  DetectorTrainResult r;
  Status st = TrainDetector(config, std::make_unique<LocalStrategy>(), Quiet(), &r);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(r.steps, 100);
  ASSERT_TRUE(r.evaluated);
  EXPECT_GT(r.metrics.mean_ap50, before.mean_ap50 + 0.5)
      << "untrained AP50 " << before.mean_ap50 << ", trained " << r.metrics.mean_ap50;
  EXPECT_GE(r.metrics.mean_ap50, r.metrics.mean_ap);

  // eval.json holds the per-category figures; model.pt loads as a detector.
  std::ifstream in(dir_ / "eval.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j.at("task"), "detection");
  EXPECT_NEAR(j.at("model").at("mean_ap50").get<double>(), r.metrics.mean_ap50, 1e-9);
  EXPECT_TRUE(j.at("model").at("per_category").contains("footwear"));
  models::CenterNet loaded{nullptr};
  ModelConfig mc;
  ASSERT_TRUE(LoadDetector(dir_.string(), &loaded, &mc).ok());
  EXPECT_EQ(mc.detector().widths_size(), 3);
  const DetectionMetrics again = EvaluateDetector(*loaded, models::DetectorCategories(mc), eval, 20);
  EXPECT_NEAR(again.mean_ap50, r.metrics.mean_ap50, 1e-6);
}

TEST_F(DetectorJobTest, InterruptedAndResumedEqualsStraight) {
  const fs::path a = dir_ / "a", b = dir_ / "b";
  const std::vector<std::string> small = {"data.snaps.train_count=224", "eval.at_end=false", "training.epochs=2",
                                          "checkpoint.every_steps=4"};
  ASSERT_TRUE(TrainDetector(TinyConfig(a.string(), small), std::make_unique<LocalStrategy>(), Quiet(), nullptr).ok());

  TrainerOptions stop = Quiet();
  stop.stop_after_steps = 10;  // 2 epochs x 14 steps; checkpoint at 8
  DetectorTrainResult first;
  ASSERT_TRUE(TrainDetector(TinyConfig(b.string(), small), std::make_unique<LocalStrategy>(), stop, &first).ok());
  EXPECT_EQ(first.steps, 10);
  TrainerOptions resume = Quiet();
  resume.resume = true;
  DetectorTrainResult second;
  Status st = TrainDetector(TinyConfig(b.string(), small), std::make_unique<LocalStrategy>(), resume, &second);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(second.resumed_from_step, 8);
  EXPECT_EQ(second.steps, 28);

  models::CenterNet ma{nullptr}, mb{nullptr};
  ModelConfig ca, cb;
  ASSERT_TRUE(LoadDetector(a.string(), &ma, &ca).ok());
  ASSERT_TRUE(LoadDetector(b.string(), &mb, &cb).ok());
  const auto pa = ma->named_parameters(), pb = mb->named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (const auto& p : pa) EXPECT_TRUE(torch::equal(p.value(), pb[p.key()])) << p.key() << " differs";
  const auto ba = ma->named_buffers(), bb = mb->named_buffers();
  for (const auto& x : ba) EXPECT_TRUE(torch::equal(x.value(), bb[x.key()])) << x.key() << " differs";
}

TEST_F(DetectorJobTest, ConfigRefusesWhatTheDetectorCannotDo) {
  JobConfig config;
  const std::string base = R"(name: "d" model { name: "centernet_detector" } data { dataset: "fashion_mnist_snaps" } )";
  Status st = ParseJobConfig(base + "parallelism { async {} }", "d.textproto", {}, &config);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("parallelism: the detector trains with parallelism.sync"));
  st = ParseJobConfig(R"(name: "d" model { name: "centernet_detector" })", "d.textproto", {}, &config);
  EXPECT_THAT(st.message(), HasSubstr("data.dataset: the detector trains on street snaps"));
  st = ParseJobConfig(base, "d.textproto", {"data.snaps.canvas=130"}, &config);
  EXPECT_THAT(st.message(), HasSubstr("data.snaps.canvas: must be a multiple of 4"));
  st = ParseJobConfig(R"(name: "d" model { name: "centernet_detector" detector { categories: ["tops", "tops"] } }
                         data { dataset: "fashion_mnist_snaps" })",
                      "d.textproto", {}, &config);
  EXPECT_THAT(st.message(), HasSubstr("model.detector.categories[1]: repeats 'tops'"));
}

TEST_F(DetectorJobTest, SnapDirectoryWithOtherCategoriesIsRefused) {
  // A COCO directory whose categories are not the detector's.
  data::Snap s;
  s.id = 1;
  s.rows = s.cols = 64;
  s.pixels.assign(64 * 64, 0);
  s.items.push_back({{4, 4, 20, 20}, 0, -1, -1});
  ASSERT_TRUE(data::WriteSnapDirectory((dir_ / "snaps").string(), {s}, {"hats"}).ok());
  const JobConfig config = TinyConfig((dir_ / "run").string(), {"data.snaps.train_dir=" + (dir_ / "snaps").string()});
  Status st = TrainDetector(config, std::make_unique<LocalStrategy>(), Quiet(), nullptr);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("has categories [hats] but model.detector.categories is [tops, bottoms, bags, footwear]"));
  EXPECT_FALSE(fs::exists(dir_ / "run" / "model.pt"));
}

}  // namespace
}  // namespace dtrain::worker
