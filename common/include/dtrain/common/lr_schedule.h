// Learning-rate schedules: linear warm-up, then constant, cosine or step decay.
//
// Pure function of the step, so that every worker (and a resumed job, and a
// parameter server applying updates) computes the same rate for the same step.
#pragma once

#include <cstdint>

#include "dtrain/job.pb.h"

namespace dtrain {

struct LrScheduleOptions {
  ScheduleConfig schedule;   // kind, warm-up, decay
  double base_lr = 0.1;      // the peak, reached at the end of warm-up
  int64_t total_steps = 1;   // steps of the whole job
  int64_t steps_per_epoch = 1;
};

// Learning rate for `step` (0-based; steps past total_steps keep the last rate).
//   warm-up (first warmup_fraction x total_steps steps): linear from
//     warmup_start_ratio x base_lr to base_lr;
//   CONSTANT: base_lr;
//   COSINE: base_lr x (r + (1 - r) x (1 + cos(pi x t)) / 2), t in [0, 1] over the
//     steps after warm-up, r = min_lr_ratio;
//   STEP: base_lr x gamma^(number of milestones, in epochs, reached).
double LearningRate(const LrScheduleOptions& options, int64_t step);

}  // namespace dtrain
