// Pipelined model parallelism, the engine (docs/pipeline.md): cutting a
// model's ordered layers into stages, the GPipe and 1F1B schedules, and one
// pipelined mini-batch on one stage. The trainer drives it through the
// pipeline strategy (pipeline_strategy.h: stages x replicas, checkpoints).
//
// One pipelined mini-batch on stage s of S (StageExecutor::RunMiniBatch):
//   1. The mini-batch of B samples splits into M micro-batches of
//      floor(B/M) or ceil(B/M) samples (the first B mod M get one more);
//      every stage computes the same split from B and M.
//   2. The stage runs its schedule (Schedule below), a list of forwards and
//      backwards of micro-batches:
//      F(i): stage 0 takes micro-batch i of the inputs; stage s > 0 receives
//            its activation from stage s-1. The stage's layers run forward;
//            stage S-1 computes the loss of micro-batch i, every other stage
//            sends the output to stage s+1. The output (and the received
//            input, which needs its gradient) stays alive until B(i).
//      B(i): stage S-1 runs backward from loss_i x (n_i / B), where n_i is
//            the micro-batch's size: the accumulated gradient is then the
//            mean over the mini-batch, also when the micro-batches are
//            uneven (scaling by 1/M instead is the classic bug, and a test
//            checks against it). Stage s < S-1 receives the gradient of its
//            output from stage s+1 and runs backward from it. Every stage
//            > 0 sends the gradient of its input to stage s-1.
//   3. Gradients accumulate in the stage's parameters over the M backwards
//      (flush semantics: the caller steps the optimizer once afterwards), so
//      one pipelined step equals the same M micro-batches run one after the
//      other through the whole model with the same scaling, and, for layers
//      without batch statistics, one non-pipelined step on the mini-batch.
//   4. BatchNorm is deferred (as in torchgpipe): the forward of a
//      micro-batch normalises with that micro-batch's statistics (what the
//      gradients above are exact for), but the running statistics are
//      updated once per mini-batch with the whole mini-batch's mean and
//      variance, combined from the micro-batches' (pipeline.cc says how), so
//      evaluation sees what one non-pipelined forward of the mini-batch would
//      have left. Exact: each BatchNorm's running statistics are the
//      mean and variance, over the whole mini-batch, of the inputs it saw,
//      applied once with its momentum; num_batches_tracked advances by one.
//      Not exact: the normalisation itself uses micro-batch statistics, so
//      the gradients and the inputs of deeper BatchNorms differ slightly
//      from a non-pipelined step's (inherent to micro-batching; the first
//      BatchNorm's statistics match a non-pipelined forward to float
//      precision, the test checks it).
//
// How neighbours agree on shape and dtype: before each activation, the
// sender sends a header of kHeaderLength int64 values (the number of
// dimensions, the sizes, zero padding, then the torch dtype code); the
// receiver allocates from it
// and checks it. A gradient has the shape of the activation it belongs to,
// which both sides know, so it travels without a header. Tags: activation
// header 4i, activation 4i+1, gradient 4i+2, for micro-batch i.
// Sends are non-blocking and waited for at the end of the mini-batch, so no
// order of sends and receives between neighbours can deadlock. Receives are
// posted one operation ahead (the header of the next forward's activation,
// the gradient of the next backward), so they complete while the current
// operation computes; an activation is received at its forward, after its
// header.
//
// Thread-safety: a StageExecutor is driven by one thread.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/job.pb.h"
#include "dtrain/worker/collective/collective.h"

namespace dtrain::worker::pipeline {

// ---- partitioning ----------------------------------------------------------

// Cuts `costs` (one per layer, in order) into `stages` contiguous, non-empty
// ranges so that the largest range's total cost is as small as possible.
// *layers_per_stage receives the number of layers of each stage.
// InvalidArgument when there are fewer layers than stages, a cost is
// negative or not finite, or stages < 1.
Status BalanceByCost(const std::vector<double>& costs, int stages, std::vector<int>* layers_per_stage);

// Milliseconds of forward plus backward of each layer of `layers` on
// `sample` (the median of `repeats` runs after one warm-up run), feeding
// each layer the previous layer's output. The layers' BatchNorm running
// statistics and gradients are as before afterwards.
std::vector<double> MeasureLayerMs(torch::nn::Sequential& layers, const torch::Tensor& sample, int repeats);

// Parameters (elements) of each layer of `layers`.
std::vector<double> LayerParameterCounts(torch::nn::Sequential& layers);

// Where each stage begins and ends, and what it holds.
struct Partition {
  std::vector<int> layers_per_stage;
  std::vector<int64_t> parameters;  // per stage
  std::vector<double> ms;           // per stage; empty when not measured
  // "explicit", "measured time" or "parameter count".
  std::string source;

  int begin(int stage) const;
  int end(int stage) const { return begin(stage) + layers_per_stage[static_cast<size_t>(stage)]; }
};

// The partition of `layers` into config.stages() stages:
// config.layers_per_stage when given (InvalidArgument, naming the field,
// when it has the wrong number of entries or does not add up to the layer
// count); otherwise AUTO: balanced by MeasureLayerMs on `sample`, or by
// parameter count when `sample` is undefined.
Status PartitionModel(const PipelineConfig& config, torch::nn::Sequential& layers, const torch::Tensor& sample,
                      Partition* partition);

// A table: stage, layers, parameters and milliseconds per stage.
std::string DescribePartition(const Partition& partition);

// ---- schedules ---------------------------------------------------------------

struct Op {
  bool forward = true;
  int micro_batch = 0;
};

// The order of forwards and backwards on `stage` of `stages` for
// `micro_batches` micro-batches:
//   GPIPE:       F(0) .. F(M-1), then B(0) .. B(M-1);
//   ONE_F_ONE_B: min(S - s - 1, M) warm-up forwards, then one forward and
//                one backward in turn while forwards remain, then the
//                remaining backwards (cool-down). Stage s then holds at most
//                min(S - s, M) micro-batches of activations at once, GPipe M.
std::vector<Op> Schedule(PipelineConfig::Schedule kind, int stages, int stage, int micro_batches);

// The largest number of micro-batches whose activations are alive at once
// (forwarded, not yet backwarded) under `ops`.
int PeakInFlight(const std::vector<Op>& ops);

// ---- execution ---------------------------------------------------------------

// Sizes of the micro-batches of a mini-batch of `batch` samples (step 1).
std::vector<int64_t> MicroBatchSizes(int64_t batch, int micro_batches);

struct StageOptions {
  int stage = 0;
  int stages = 1;
  // Ranks of the neighbours in the Collective (-1 at the ends).
  int prev_rank = -1;
  int next_rank = -1;
  int micro_batches = 1;
  PipelineConfig::Schedule schedule = PipelineConfig::ONE_F_ONE_B;
  // GPipe only: the last stage computes the loss once, over the outputs of
  // all micro-batches together (a triplet miner that needs the whole
  // mini-batch), and backward from it reaches every micro-batch; the
  // micro-batches' input gradients then go back one by one.
  bool whole_batch_loss = false;
};

// The last stage's loss of one micro-batch (or, with whole_batch_loss, of
// the whole mini-batch): the mean over its samples.
using MicroBatchLoss = std::function<torch::Tensor(const torch::Tensor& output, const torch::Tensor& labels)>;

// One forward or backward of the schedule as it ran: the compute, from
// after its input arrived to after its output was handed to the network
// (seconds of the steady clock, comparable between processes on one machine).
struct TimedOp {
  bool forward = true;
  int micro_batch = 0;
  double start_s = 0;
  double end_s = 0;
};

struct StageStats {
  // Mean loss over the mini-batch (last stage only).
  double loss = 0;
  // Peak micro-batches of activations alive at once, and their bytes.
  int peak_in_flight = 0;
  int64_t peak_activation_bytes = 0;
  // Seconds waiting for neighbours (receives and the final send waits).
  double wait_s = 0;
  // Every op of the schedule, in order (for timelines and idle fractions).
  std::vector<TimedOp> timeline;
};

class StageExecutor {
 public:
  // `stage` holds this stage's layers; `comm` links the stages (it must
  // outlive the executor).
  StageExecutor(torch::nn::Sequential stage, collective::Collective* comm, StageOptions options);

  // One mini-batch of `batch` samples (steps 1-3). `inputs` are the images
  // on stage 0 (ignored elsewhere); `labels` are needed on the last stage.
  // Adds to the stage's parameter gradients; does not zero them or step.
  // On an error (a neighbour gone, a header that does not match) the
  // pipeline is broken and the caller should end the job.
  Status RunMiniBatch(const torch::Tensor& inputs, const torch::Tensor& labels, int64_t batch,
                      const MicroBatchLoss& loss, StageStats* stats);

 private:
  torch::nn::Sequential stage_;
  collective::Collective* comm_;
  StageOptions options_;
};

// Header length (int64 values) of an activation message.
inline constexpr int kHeaderLength = 8;

}  // namespace dtrain::worker::pipeline
