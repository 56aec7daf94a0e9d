#include "dtrain/common/lr_schedule.h"

#include <gtest/gtest.h>

#include <cmath>

namespace dtrain {
namespace {

LrScheduleOptions Options(ScheduleConfig::Kind kind) {
  LrScheduleOptions o;
  o.schedule.set_kind(kind);
  o.schedule.set_warmup_fraction(0.1f);
  o.schedule.set_warmup_start_ratio(0.01f);
  o.schedule.set_min_lr_ratio(0.001f);
  o.schedule.set_gamma(0.1f);
  o.base_lr = 0.2;
  o.total_steps = 1000;
  o.steps_per_epoch = 100;
  return o;
}

TEST(LrScheduleTest, WarmupIsLinearFromStartRatio) {
  LrScheduleOptions o = Options(ScheduleConfig::COSINE);
  EXPECT_NEAR(LearningRate(o, 0), 0.002, 1e-9);
  EXPECT_NEAR(LearningRate(o, 50), 0.002 + (0.2 - 0.002) * 0.5, 1e-7);
  EXPECT_NEAR(LearningRate(o, 100), 0.2, 1e-7);  // warm-up ends at the peak
}

TEST(LrScheduleTest, CosineDecaysToMinRatio) {
  LrScheduleOptions o = Options(ScheduleConfig::COSINE);
  const double mid = LearningRate(o, 100 + 899 / 2);
  EXPECT_NEAR(mid, 0.2 * (0.001 + 0.999 * 0.5 * (1 + std::cos(M_PI * (449.0 / 899.0)))), 1e-7);
  EXPECT_NEAR(LearningRate(o, 999), 0.2 * 0.001, 1e-9);
  EXPECT_NEAR(LearningRate(o, 5000), 0.2 * 0.001, 1e-9) << "past the end keeps the last rate";
  for (int s = 101; s < 1000; ++s) EXPECT_LE(LearningRate(o, s), LearningRate(o, s - 1) + 1e-12);
}

TEST(LrScheduleTest, StepMultipliesAtMilestoneEpochs) {
  LrScheduleOptions o = Options(ScheduleConfig::STEP);
  o.schedule.set_warmup_fraction(0);
  o.schedule.add_milestones(3);
  o.schedule.add_milestones(6);
  EXPECT_NEAR(LearningRate(o, 299), 0.2, 1e-9);
  EXPECT_NEAR(LearningRate(o, 300), 0.02, 1e-9);
  EXPECT_NEAR(LearningRate(o, 650), 0.002, 1e-9);
}

TEST(LrScheduleTest, ConstantAfterWarmup) {
  LrScheduleOptions o = Options(ScheduleConfig::CONSTANT);
  EXPECT_NEAR(LearningRate(o, 500), 0.2, 1e-9);
  EXPECT_LT(LearningRate(o, 10), 0.2);
}

}  // namespace
}  // namespace dtrain
