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
// Plain float loops over the slice, no LibTorch: a shard links no torch. Each
// case has its own loop so that GCC vectorises it (optimizer.cc is built
// with -O3).
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

  // The same update in parts, for a gradient that arrives block by block
  // (the shard applies pushes straight from the received buffers):
  // Begin counts the step and sizes the state of a slice of n elements; Run
  // updates elements [begin, begin + count) from the gradient block
  // grad[0, count) (float32 at any alignment: received bytes are read where
  // they lie), reading the parameters at in + begin and writing them at
  // out + begin (out may equal in; a different out leaves in untouched, for
  // values a pull still reads). Every element exactly once per update.
  struct Step {
    SlotState* state = nullptr;
    float lr = 0;
    bool first = false;           // SGD: the momentum buffer starts now
    float step_size = 0;          // AdamW: lr / (1 - beta1^t)
    float sqrt_bias_correction2 = 1;  // AdamW: sqrt(1 - beta2^t)
  };
  Step Begin(int64_t n, double lr, SlotState* state) const;
  void Run(const Step& step, const float* in, float* out, const void* grad, int64_t begin, int64_t count) const;

  // The slot names of this optimizer's state.
  std::vector<std::string> SlotNames() const;

  OptimizerConfig::Kind kind() const { return config_.kind(); }

 private:
  OptimizerConfig config_;
};

}  // namespace dtrain::paramserver
