#include "dtrain/common/lr_schedule.h"

#include <algorithm>
#include <cmath>

namespace dtrain {

double LearningRate(const LrScheduleOptions& o, int64_t step) {
  const ScheduleConfig& s = o.schedule;
  const int64_t total = std::max<int64_t>(o.total_steps, 1);
  step = std::clamp<int64_t>(step, 0, total - 1);
  const int64_t warmup = static_cast<int64_t>(std::floor(s.warmup_fraction() * static_cast<double>(total)));
  if (step < warmup) {
    const double start = s.warmup_start_ratio();
    const double t = static_cast<double>(step) / static_cast<double>(warmup);
    return o.base_lr * (start + (1.0 - start) * t);
  }
  switch (s.kind()) {
    case ScheduleConfig::CONSTANT:
      return o.base_lr;
    case ScheduleConfig::COSINE: {
      const int64_t span = std::max<int64_t>(total - warmup - 1, 1);
      const double t = static_cast<double>(step - warmup) / static_cast<double>(span);
      const double r = s.min_lr_ratio();
      return o.base_lr * (r + (1.0 - r) * 0.5 * (1.0 + std::cos(M_PI * std::min(t, 1.0))));
    }
    case ScheduleConfig::STEP: {
      const double epoch = static_cast<double>(step) / static_cast<double>(std::max<int64_t>(o.steps_per_epoch, 1));
      double lr = o.base_lr;
      for (float m : s.milestones()) {
        if (epoch >= m) lr *= s.gamma();
      }
      return lr;
    }
  }
  return o.base_lr;
}

}  // namespace dtrain
