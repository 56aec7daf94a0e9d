// Internal to worker/: turning LibTorch exceptions into a Status at the
// boundary of a training step, a checkpoint snapshot or a model save.
#pragma once

#include <torch/torch.h>

#include <exception>
#include <string>

#include "dtrain/common/status.h"

namespace dtrain::worker::internal {

// Runs f() (returning Status); a c10::Error or other exception becomes
// Internal("<what>: <message>").
template <typename F>
Status Guard(const char* what, F&& f) {
  try {
    return f();
  } catch (const c10::Error& e) {
    return Status::Internal(std::string(what) + ": " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return Status::Internal(std::string(what) + ": " + e.what());
  }
}

}  // namespace dtrain::worker::internal
