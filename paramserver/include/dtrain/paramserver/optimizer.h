// The optimizers a parameter-server shard applies to the slices it owns, one
// push at a time: SGD (momentum, Nesterov, weight decay) and AdamW, with the
// exact update rules of torch::optim::SGD and torch::optim::AdamW (the ones
// the trainer uses in sync mode), so a job trains the same in both modes and
// its optimizer state moves between them through checkpoints.
//
// The state of one slice lives in SlotState; its slots carry the names the
// checkpoint format uses (optim/<tensor>/<slot>, worker/checkpointing.h):
// SGD "momentum_buffer"; AdamW "exp_avg", "exp_avg_sq" and "step".
//
// Plain float loops over the slice, no LibTorch: a shard links no torch.
//
// Thread-safety: ServerOptimizer is immutable after construction; Apply may
// run on many threads at once for different SlotStates (the shard holds one
// lock per tensor slice).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/job.pb.h"

namespace dtrain::paramserver {

struct SlotState {
  std::vector<float> momentum_buffer;  // SGD with momentum; empty before the first update
  std::vector<float> exp_avg;          // AdamW
  std::vector<float> exp_avg_sq;       // AdamW
  int64_t step = 0;                    // updates applied to this slice
};

class ServerOptimizer {
 public:
  // InvalidArgument naming the field for a negative rate, momentum or decay,
  // betas outside [0, 1), or eps <= 0.
  static Status Create(const OptimizerConfig& config, ServerOptimizer* out);

  // One update of `n` elements: param -= lr * direction(grad, state).
  void Apply(float* param, const float* grad, int64_t n, double lr, SlotState* state) const;

  // The slot names of this optimizer's state.
  std::vector<std::string> SlotNames() const;

  OptimizerConfig::Kind kind() const { return config_.kind(); }

 private:
  OptimizerConfig config_;
};

}  // namespace dtrain::paramserver
