#include "dtrain/worker/pipeline.h"

#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <limits>

namespace dtrain::worker::pipeline {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// Heap bytes in use (malloc'd and mmapped): what a forward leaves allocated
// for its backward shows up here on the CPU.
int64_t HeapBytes() {
  const struct mallinfo2 m = mallinfo2();
  return static_cast<int64_t>(m.uordblks + m.hblkhd);
}

int Tag(int micro_batch, int kind) { return micro_batch * 4 + kind; }
constexpr int kHeaderTag = 0;
constexpr int kActivationTag = 1;
constexpr int kGradientTag = 2;

// Deferred BatchNorm (step 4 of pipeline.h): every BatchNorm of the stage
// normalises with its micro-batch's statistics, but its running statistics
// are updated once per mini-batch, with the statistics of the whole
// mini-batch, as one non-pipelined forward would.
//
// How: during the micro-batch forwards each BatchNorm runs with momentum 1,
// so that after a forward its running mean and (unbiased) variance are that
// micro-batch's; they are collected, and at the end the mini-batch's mean
// and variance are combined from them (the parallel-variance formula with
// the element counts n_i x spatial size) and applied to the saved running
// statistics with the module's own momentum; num_batches_tracked advances
// by one. The spatial size of a BatchNorm's input is taken as that of its
// layer's output, which holds for every layer of the embedder (stem, basic
// blocks, head: models/embedder.h).
class DeferredBatchNorm {
 public:
  DeferredBatchNorm(torch::nn::Sequential& stage, int micro_batches) {
    size_t layer = 0;
    for (auto& any : *stage) {
      for (const auto& m : any.ptr()->modules(/*include_self=*/true)) {
        if (auto* bn = dynamic_cast<torch::nn::BatchNorm2dImpl*>(m.get())) Add(layer, bn);
        if (auto* bn = dynamic_cast<torch::nn::BatchNorm1dImpl*>(m.get())) Add(layer, bn);
      }
      ++layer;
    }
    layer_spatial_.assign(layer, 1);
    (void)micro_batches;
  }
  bool empty() const { return norms_.empty(); }
  // The spatial size of layer `layer`'s output.
  void SetSpatial(size_t layer, int64_t spatial) { layer_spatial_[layer] = spatial; }
  // After micro-batch i's forward (n samples).
  void Collect(int64_t n) {
    for (Norm& b : norms_) {
      b.means.push_back(b.running_mean->clone());
      b.vars.push_back(b.running_var->clone());
      b.counts.push_back(n * layer_spatial_[b.layer]);
    }
  }
  // The running statistics of the whole mini-batch, and the momentum back.
  void Finish() {
    torch::NoGradGuard no_grad;
    for (Norm& b : norms_) {
      if (!b.counts.empty()) {
        double total = 0;
        for (int64_t c : b.counts) total += static_cast<double>(c);
        torch::Tensor mean = torch::zeros_like(b.mean0);
        for (size_t i = 0; i < b.means.size(); ++i) mean += b.means[i] * (static_cast<double>(b.counts[i]) / total);
        // Sum of squared deviations from the mini-batch mean.
        torch::Tensor ss = torch::zeros_like(b.var0);
        for (size_t i = 0; i < b.means.size(); ++i) {
          const double c = static_cast<double>(b.counts[i]);
          ss += b.vars[i] * (c - 1.0) + (b.means[i] - mean).pow(2) * c;
        }
        const torch::Tensor var = ss / std::max(total - 1.0, 1.0);
        const double m = b.momentum0.has_value() ? *b.momentum0 : 1.0 / static_cast<double>(b.count0 + 1);
        b.running_mean->copy_(b.mean0 * (1.0 - m) + mean * m);
        b.running_var->copy_(b.var0 * (1.0 - m) + var * m);
        b.num_batches_tracked->fill_(b.count0 + 1);
      }
      *b.momentum = b.momentum0;
    }
    norms_.clear();
  }
  // On an error: the running statistics and momentum as they were.
  ~DeferredBatchNorm() {
    torch::NoGradGuard no_grad;
    for (Norm& b : norms_) {
      b.running_mean->copy_(b.mean0);
      b.running_var->copy_(b.var0);
      b.num_batches_tracked->fill_(b.count0);
      *b.momentum = b.momentum0;
    }
  }

 private:
  struct Norm {
    size_t layer = 0;
    torch::Tensor* running_mean = nullptr;
    torch::Tensor* running_var = nullptr;
    torch::Tensor* num_batches_tracked = nullptr;
    std::optional<double>* momentum = nullptr;
    torch::Tensor mean0, var0;
    int64_t count0 = 0;
    std::optional<double> momentum0;
    std::vector<torch::Tensor> means, vars;
    std::vector<int64_t> counts;
  };
  template <typename BN>
  void Add(size_t layer, BN* bn) {
    if (!bn->is_training() || !bn->options.track_running_stats()) return;
    Norm b;
    b.layer = layer;
    b.running_mean = &bn->running_mean;
    b.running_var = &bn->running_var;
    b.num_batches_tracked = &bn->num_batches_tracked;
    b.momentum = &bn->options.momentum();
    b.mean0 = bn->running_mean.clone();
    b.var0 = bn->running_var.clone();
    b.count0 = bn->num_batches_tracked.template item<int64_t>();
    b.momentum0 = bn->options.momentum();
    bn->options.momentum(1.0);
    norms_.push_back(std::move(b));
  }

  std::vector<Norm> norms_;
  std::vector<int64_t> layer_spatial_;
};

}  // namespace

// ---- partitioning ----------------------------------------------------------

Status BalanceByCost(const std::vector<double>& costs, int stages, std::vector<int>* layers_per_stage) {
  const int n = static_cast<int>(costs.size());
  if (stages < 1) return Status::InvalidArgument("a pipeline needs at least 1 stage, got " + std::to_string(stages));
  if (n < stages) {
    return Status::InvalidArgument("cannot cut " + std::to_string(n) + " layer(s) into " + std::to_string(stages) +
                                   " non-empty stages");
  }
  for (size_t i = 0; i < costs.size(); ++i) {
    if (!std::isfinite(costs[i]) || costs[i] < 0) {
      return Status::InvalidArgument("layer " + std::to_string(i) + " has cost " + std::to_string(costs[i]));
    }
  }
  std::vector<double> prefix(static_cast<size_t>(n) + 1, 0.0);
  for (int i = 0; i < n; ++i) prefix[static_cast<size_t>(i) + 1] = prefix[static_cast<size_t>(i)] + costs[static_cast<size_t>(i)];
  auto range = [&](int a, int b) { return prefix[static_cast<size_t>(b)] - prefix[static_cast<size_t>(a)]; };
  // best[s][i]: the smallest possible largest stage cost when the first i
  // layers form s stages; cut[s][i]: where the last of them begins.
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<std::vector<double>> best(static_cast<size_t>(stages) + 1, std::vector<double>(static_cast<size_t>(n) + 1, inf));
  std::vector<std::vector<int>> cut(static_cast<size_t>(stages) + 1, std::vector<int>(static_cast<size_t>(n) + 1, 0));
  best[0][0] = 0;
  for (int s = 1; s <= stages; ++s) {
    for (int i = s; i <= n - (stages - s); ++i) {
      for (int j = s - 1; j < i; ++j) {
        const double prev = best[static_cast<size_t>(s) - 1][static_cast<size_t>(j)];
        if (prev == inf) continue;
        const double c = std::max(prev, range(j, i));
        // Ties: the earlier cut, so that equal costs split as evenly as the
        // recursion finds first (deterministic).
        if (c < best[static_cast<size_t>(s)][static_cast<size_t>(i)]) {
          best[static_cast<size_t>(s)][static_cast<size_t>(i)] = c;
          cut[static_cast<size_t>(s)][static_cast<size_t>(i)] = j;
        }
      }
    }
  }
  std::vector<int> counts(static_cast<size_t>(stages));
  int end = n;
  for (int s = stages; s >= 1; --s) {
    const int begin = cut[static_cast<size_t>(s)][static_cast<size_t>(end)];
    counts[static_cast<size_t>(s) - 1] = end - begin;
    end = begin;
  }
  *layers_per_stage = std::move(counts);
  return Status::OK();
}

std::vector<double> MeasureLayerMs(torch::nn::Sequential& layers, const torch::Tensor& sample, int repeats) {
  const size_t n = layers->size();
  // The measuring forwards must leave no trace: BatchNorm running
  // statistics and gradients are put back as they were.
  std::vector<torch::Tensor> buffers = layers->buffers(), saved;
  for (const auto& b : buffers) saved.push_back(b.clone());
  std::vector<torch::Tensor> params = layers->parameters(), grads;
  for (const auto& p : params) grads.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
  std::vector<torch::nn::AnyModule*> modules;
  for (auto& m : *layers) modules.push_back(&m);
  std::vector<std::vector<double>> runs(n);
  for (int r = 0; r < repeats + 1; ++r) {
    torch::Tensor x = sample;
    for (size_t i = 0; i < n; ++i) {
      torch::Tensor in = x.detach().requires_grad_(i > 0);
      const auto t0 = Clock::now();
      torch::Tensor out = modules[i]->forward(in);
      out.backward(torch::ones_like(out));
      const auto t1 = Clock::now();
      if (r > 0) runs[i].push_back(1e3 * Seconds(t0, t1));  // run 0 warms up
      x = out.detach();
    }
  }
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < buffers.size(); ++i) buffers[i].copy_(saved[i]);
  }
  for (size_t i = 0; i < params.size(); ++i) params[i].mutable_grad() = grads[i];
  std::vector<double> ms(n);
  for (size_t i = 0; i < n; ++i) {
    std::sort(runs[i].begin(), runs[i].end());
    ms[i] = runs[i].empty() ? 0.0 : runs[i][runs[i].size() / 2];
  }
  return ms;
}

std::vector<double> LayerParameterCounts(torch::nn::Sequential& layers) {
  std::vector<double> counts;
  for (size_t i = 0; i < layers->size(); ++i) {
    int64_t c = 0;
    for (const auto& p : layers->ptr(i)->parameters()) c += p.numel();
    counts.push_back(static_cast<double>(c));
  }
  return counts;
}

int Partition::begin(int stage) const {
  int b = 0;
  for (int s = 0; s < stage; ++s) b += layers_per_stage[static_cast<size_t>(s)];
  return b;
}

Status PartitionModel(const PipelineConfig& config, torch::nn::Sequential& layers, const torch::Tensor& sample,
                      Partition* partition) {
  const int stages = config.stages();
  const int n = static_cast<int>(layers->size());
  Partition p;
  std::vector<double> ms;
  if (config.layers_per_stage_size() > 0) {
    if (config.layers_per_stage_size() != stages) {
      return Status::InvalidArgument("parallelism.pipeline.layers_per_stage has " +
                                     std::to_string(config.layers_per_stage_size()) + " entries for " +
                                     std::to_string(stages) + " stages");
    }
    int total = 0;
    for (int c : config.layers_per_stage()) {
      if (c < 1) return Status::InvalidArgument("parallelism.pipeline.layers_per_stage: every stage needs a layer");
      total += c;
    }
    if (total != n) {
      return Status::InvalidArgument("parallelism.pipeline.layers_per_stage adds up to " + std::to_string(total) +
                                     " layers; the model has " + std::to_string(n));
    }
    p.layers_per_stage.assign(config.layers_per_stage().begin(), config.layers_per_stage().end());
    p.source = "explicit";
  } else if (sample.defined()) {
    ms = MeasureLayerMs(layers, sample, 3);
    DTRAIN_RETURN_IF_ERROR(BalanceByCost(ms, stages, &p.layers_per_stage));
    p.source = "measured time";
  } else {
    DTRAIN_RETURN_IF_ERROR(BalanceByCost(LayerParameterCounts(layers), stages, &p.layers_per_stage));
    p.source = "parameter count";
  }
  const std::vector<double> params = LayerParameterCounts(layers);
  for (int s = 0; s < stages; ++s) {
    double sum_params = 0, sum_ms = 0;
    for (int i = p.begin(s); i < p.end(s); ++i) {
      sum_params += params[static_cast<size_t>(i)];
      if (!ms.empty()) sum_ms += ms[static_cast<size_t>(i)];
    }
    p.parameters.push_back(static_cast<int64_t>(sum_params));
    if (!ms.empty()) p.ms.push_back(sum_ms);
  }
  *partition = std::move(p);
  return Status::OK();
}

std::string DescribePartition(const Partition& p) {
  std::string out = "pipeline partition (" + p.source + "):\n  stage  layers     parameters";
  if (!p.ms.empty()) out += "   fwd+bwd ms";
  out += "\n";
  char line[160];
  for (size_t s = 0; s < p.layers_per_stage.size(); ++s) {
    const int b = p.begin(static_cast<int>(s));
    std::snprintf(line, sizeof line, "  %5zu  %3d-%-3d  %13lld", s, b, b + p.layers_per_stage[s] - 1,
                  static_cast<long long>(p.parameters[s]));
    out += line;
    if (!p.ms.empty()) {
      std::snprintf(line, sizeof line, "  %11.2f", p.ms[s]);
      out += line;
    }
    out += "\n";
  }
  return out;
}

// ---- schedules ---------------------------------------------------------------

std::vector<Op> Schedule(PipelineConfig::Schedule kind, int stages, int stage, int micro_batches) {
  std::vector<Op> ops;
  const int m = micro_batches;
  if (kind == PipelineConfig::GPIPE) {
    for (int i = 0; i < m; ++i) ops.push_back({true, i});
    for (int i = 0; i < m; ++i) ops.push_back({false, i});
    return ops;
  }
  const int warmup = std::min(stages - stage - 1, m);
  int next_forward = 0, next_backward = 0;
  for (; next_forward < warmup; ++next_forward) ops.push_back({true, next_forward});
  while (next_forward < m) {
    ops.push_back({true, next_forward++});
    ops.push_back({false, next_backward++});
  }
  while (next_backward < m) ops.push_back({false, next_backward++});
  return ops;
}

int PeakInFlight(const std::vector<Op>& ops) {
  int alive = 0, peak = 0;
  for (const Op& op : ops) {
    alive += op.forward ? 1 : -1;
    peak = std::max(peak, alive);
  }
  return peak;
}

// ---- execution ---------------------------------------------------------------

std::vector<int64_t> MicroBatchSizes(int64_t batch, int micro_batches) {
  std::vector<int64_t> sizes(static_cast<size_t>(micro_batches), batch / micro_batches);
  for (int64_t i = 0; i < batch % micro_batches; ++i) ++sizes[static_cast<size_t>(i)];
  return sizes;
}

StageExecutor::StageExecutor(torch::nn::Sequential stage, collective::Collective* comm, StageOptions options)
    : stage_(std::move(stage)), comm_(comm), options_(options) {}

Status StageExecutor::RunMiniBatch(const torch::Tensor& inputs, const torch::Tensor& labels, int64_t batch,
                                   const MicroBatchLoss& loss, StageStats* stats) {
  const StageOptions& o = options_;
  const bool first = o.stage == 0;
  const bool last = o.stage == o.stages - 1;
  if (o.whole_batch_loss && o.schedule != PipelineConfig::GPIPE) {
    return Status::InvalidArgument("a loss over the whole mini-batch needs the GPIPE schedule (1F1B backwards "
                                   "micro-batches before the last one is forwarded)");
  }
  if (o.micro_batches < 1 || batch < o.micro_batches) {
    return Status::InvalidArgument("a mini-batch of " + std::to_string(batch) + " sample(s) cannot make " +
                                   std::to_string(o.micro_batches) + " micro-batch(es)");
  }
  const std::vector<int64_t> sizes = MicroBatchSizes(batch, o.micro_batches);
  std::vector<int64_t> offsets(sizes.size(), 0);
  for (size_t i = 1; i < sizes.size(); ++i) offsets[i] = offsets[i - 1] + sizes[i - 1];
  if (first && inputs.size(0) != batch) {
    return Status::InvalidArgument("stage 0 got " + std::to_string(inputs.size(0)) + " inputs for a batch of " +
                                   std::to_string(batch));
  }
  if (last && labels.size(0) != batch) {
    return Status::InvalidArgument("the last stage got " + std::to_string(labels.size(0)) +
                                   " labels for a batch of " + std::to_string(batch));
  }

  struct InFlight {
    torch::Tensor input;   // requires grad on stages > 0
    torch::Tensor output;  // or the scaled loss on the last stage
    int64_t heap_bytes = 0;
  };
  std::map<int, InFlight> alive;
  std::vector<torch::nn::AnyModule*> layers;
  for (auto& any : *stage_) layers.push_back(&any);
  DeferredBatchNorm deferred(stage_, o.micro_batches);
  std::vector<std::shared_ptr<collective::Work>> sends;
  std::vector<torch::Tensor> send_buffers;  // kept alive until the sends finish
  StageStats st;
  double loss_sum = 0;
  int64_t alive_bytes = 0;
  bool whole_batch_done = false;

  auto wait = [&](const std::shared_ptr<collective::Work>& w) -> Status {
    const auto t0 = Clock::now();
    Status s = w->Wait();
    st.wait_s += Seconds(t0, Clock::now());
    return s;
  };
  auto send = [&](torch::Tensor t, int dst, int tag, const std::string& label) {
    send_buffers.push_back(t);
    collective::OpOptions opt;
    opt.label = label;
    sends.push_back(comm_->Send(t, dst, tag, opt));
  };

  // Receives are posted one operation ahead: while operation k computes, the
  // point-to-point thread already takes in what operation k+1 needs (the
  // activation header of a forward, the gradient of a backward), so a
  // neighbour's message waits for no round trip when its operation comes.
  // (An activation itself is received at its forward: its size comes with
  // its header.) A posted receive's timeout counts from its posting, at
  // most one operation early.
  struct Posted {
    torch::Tensor buffer;
    std::shared_ptr<collective::Work> work;
  };
  std::map<int, Posted> headers, gradients;  // by micro-batch
  const std::vector<Op> ops = Schedule(o.schedule, o.stages, o.stage, o.micro_batches);
  auto post = [&](size_t k) {
    if (k >= ops.size()) return;
    const int i = ops[k].micro_batch;
    const std::string mb = "micro-batch " + std::to_string(i);
    collective::OpOptions opt;
    if (ops[k].forward && !first && !headers.count(i)) {
      Posted p{torch::empty({kHeaderLength}, torch::kInt64), nullptr};
      opt.label = "activation header of " + mb + " from stage " + std::to_string(o.stage - 1);
      p.work = comm_->Recv(p.buffer, o.prev_rank, Tag(i, kHeaderTag), opt);
      headers[i] = std::move(p);
    } else if (!ops[k].forward && !last && !gradients.count(i)) {
      auto f = alive.find(i);
      if (f == alive.end()) return;  // its forward is the operation before it: posted then
      Posted p{torch::empty_like(f->second.output), nullptr};
      opt.label = "gradient of " + mb + " from stage " + std::to_string(o.stage + 1);
      p.work = comm_->Recv(p.buffer, o.next_rank, Tag(i, kGradientTag), opt);
      gradients[i] = std::move(p);
    }
  };

  auto now = [] { return std::chrono::duration<double>(Clock::now().time_since_epoch()).count(); };
  for (size_t k = 0; k < ops.size(); ++k) {
    const Op& op = ops[k];
    post(k);
    post(k + 1);
    const int i = op.micro_batch;
    const std::string mb = "micro-batch " + std::to_string(i);
    TimedOp timed;
    timed.forward = op.forward;
    timed.micro_batch = i;
    if (op.forward) {
      const int64_t heap_before = HeapBytes();
      InFlight f;
      if (first) {
        f.input = inputs.narrow(0, offsets[static_cast<size_t>(i)], sizes[static_cast<size_t>(i)]);
      } else {
        torch::Tensor header = headers[i].buffer;
        DTRAIN_RETURN_IF_ERROR(wait(headers[i].work));
        headers.erase(i);
        collective::OpOptions opt;
        const int64_t* h = header.data_ptr<int64_t>();
        const int64_t ndim = h[0];
        if (ndim < 1 || ndim > kHeaderLength - 2) {
          return Status::Corruption("stage " + std::to_string(o.stage) + ": the activation header of " + mb +
                                    " has " + std::to_string(ndim) + " dimensions");
        }
        std::vector<int64_t> shape(h + 1, h + 1 + ndim);
        if (shape[0] != sizes[static_cast<size_t>(i)]) {
          return Status::Corruption("stage " + std::to_string(o.stage) + ": " + mb + " arrives with " +
                                    std::to_string(shape[0]) + " samples, expected " +
                                    std::to_string(sizes[static_cast<size_t>(i)]) +
                                    " (do both stages use the same batch and micro_batches?)");
        }
        const auto dtype = static_cast<c10::ScalarType>(h[kHeaderLength - 1]);
        torch::Tensor in = torch::empty(shape, torch::TensorOptions().dtype(dtype));
        opt.label = "activation of " + mb + " from stage " + std::to_string(o.stage - 1);
        DTRAIN_RETURN_IF_ERROR(wait(comm_->Recv(in, o.prev_rank, Tag(i, kActivationTag), opt)));
        f.input = in.requires_grad_(true);
      }
      timed.start_s = now();
      torch::Tensor out = f.input;
      for (size_t l = 0; l < layers.size(); ++l) {
        out = layers[l]->forward(out);
        if (out.dim() > 2) deferred.SetSpatial(l, out.numel() / (out.size(0) * out.size(1)));
      }
      deferred.Collect(sizes[static_cast<size_t>(i)]);
      if (last && o.whole_batch_loss) {
        f.output = out;  // the loss comes at the first backward
      } else if (last) {
        torch::Tensor l = loss(out, labels.narrow(0, offsets[static_cast<size_t>(i)], sizes[static_cast<size_t>(i)]));
        loss_sum += l.item<double>() * static_cast<double>(sizes[static_cast<size_t>(i)]);
        // Step 2, B(i): the mean over the mini-batch, whatever the split.
        f.output = l * (static_cast<double>(sizes[static_cast<size_t>(i)]) / static_cast<double>(batch));
      } else {
        out = out.contiguous();
        torch::Tensor header = torch::zeros({kHeaderLength}, torch::kInt64);
        int64_t* h = header.data_ptr<int64_t>();
        h[0] = out.dim();
        for (int64_t d = 0; d < out.dim(); ++d) h[1 + d] = out.size(d);
        h[kHeaderLength - 1] = static_cast<int64_t>(out.scalar_type());
        const std::string to = " to stage " + std::to_string(o.stage + 1);
        send(header, o.next_rank, Tag(i, kHeaderTag), "activation header of " + mb + to);
        send(out.detach(), o.next_rank, Tag(i, kActivationTag), "activation of " + mb + to);
        f.output = out;
      }
      timed.end_s = now();
      f.heap_bytes = std::max<int64_t>(0, HeapBytes() - heap_before);
      alive_bytes += f.heap_bytes;
      alive[i] = std::move(f);
      st.peak_in_flight = std::max(st.peak_in_flight, static_cast<int>(alive.size()));
      st.peak_activation_bytes = std::max(st.peak_activation_bytes, alive_bytes);
    } else {
      auto it = alive.find(i);
      if (it == alive.end()) return Status::Internal("backward of " + mb + " before its forward");
      InFlight& f = it->second;
      timed.start_s = now();
      if (last && o.whole_batch_loss) {
        if (!whole_batch_done) {
          // Every micro-batch is forwarded (GPipe): one loss over all of
          // them, one backward into every micro-batch's graph.
          std::vector<torch::Tensor> outs;
          for (auto& [k, g] : alive) outs.push_back(g.output);
          torch::Tensor l = loss(torch::cat(outs, 0), labels);
          loss_sum = l.item<double>() * static_cast<double>(batch);
          l.backward();
          whole_batch_done = true;
        }
      } else if (last) {
        f.output.backward();
      } else {
        torch::Tensor grad = gradients[i].buffer;
        DTRAIN_RETURN_IF_ERROR(wait(gradients[i].work));
        gradients.erase(i);
        timed.start_s = now();
        f.output.backward(grad);
      }
      if (!first) {
        torch::Tensor g = f.input.grad();
        if (!g.defined()) g = torch::zeros_like(f.input);
        send(g.contiguous(), o.prev_rank, Tag(i, kGradientTag), "gradient of " + mb + " to stage " + std::to_string(o.stage - 1));
      }
      timed.end_s = now();
      alive_bytes -= f.heap_bytes;
      alive.erase(it);
    }
    st.timeline.push_back(timed);
  }
  for (const auto& w : sends) DTRAIN_RETURN_IF_ERROR(wait(w));
  deferred.Finish();
  st.loss = last ? loss_sum / static_cast<double>(batch) : 0.0;
  if (stats) *stats = st;
  return Status::OK();
}

}  // namespace dtrain::worker::pipeline
