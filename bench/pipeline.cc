// bench/pipeline: pipelined training steps of the default embedder
// (widths 32-64-128, ArcFace) on S ranks (one stage each, one thread each),
// GPipe against 1F1B for M = 1, 2, 4, 8 micro-batches: images/s; each
// stage's idle fraction (1 - its compute time over the wall time, from the
// measured op timestamps) beside the bubble theory (S-1)/(M+S-1); and the
// peak activation memory of every stage (heap bytes the forwards of the
// micro-batches in flight hold; pipeline.h). Beside them, in the same run,
// one process training the whole model on the same mini-batch with 1 and
// with 2 threads: the non-pipelined references, measured before and after
// the pipelines and averaged. With --svg it draws the measured timeline of
// one mini-batch (M = 4) for GPipe and 1F1B. --widths picks the model: with
// 40-64-128 the best cut into two stages has nearly equal cost; --model
// uniform trains a stack of identical blocks instead, which every even cut
// balances (a balanced partition, which the bubble goal is about).
//
//   launch/mpirun.sh -n 2 -- build/bin/bench_pipeline [--batch 128] [--steps 6] [--widths 32,64,128]
//                                                     [--model embedder|uniform] [--uniform-blocks 8]
//                                                     [--channels 64] [--size 16] [--out FILE] [--svg FILE]
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <tuple>
#include <nlohmann/json.hpp>

#include "bench_util.h"
#include "dtrain/models/registry.h"
#include "dtrain/worker/collective/mpi_collective.h"
#include "dtrain/worker/pipeline.h"

using namespace dtrain;
namespace pipeline = dtrain::worker::pipeline;
using Clock = std::chrono::steady_clock;

namespace {

void Check(const Status& st, const char* what) {
  if (!st.ok()) {
    std::fprintf(stderr, "bench_pipeline: %s: %s\n", what, st.ToString().c_str());
    collective::MpiRuntime::Abort(1);
  }
}

// Rank 0 measures alone while the other ranks wait in a receive that sleeps
// between polls: an MPI barrier spins, and would take a core from the
// measurement.
void AwaitRankZero(collective::MpiCollective* comm) {
  torch::Tensor token = torch::zeros({1});
  if (comm->rank() == 0) {
    for (int r = 1; r < comm->size(); ++r) Check(comm->Send(token, r, 77)->Wait(), "token to rank");
  } else {
    Check(comm->Recv(token, 0, 77)->Wait(), "token from rank 0");
  }
}

// --model uniform: a stack of identical blocks (3x3 convolution, BatchNorm,
// ReLU at a fixed width and size) and a pooling head, so that an even cut
// is a balanced partition whatever the machine does to each kind of layer:
// what the bubble goal ("for a balanced partition") is about. An
// input BatchNorm comes first (MakeModel says why).
class UniformBlockImpl : public torch::nn::Module {
 public:
  explicit UniformBlockImpl(int64_t channels)
      : conv_(register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(channels, channels, 3)
                                                             .padding(1)
                                                             .bias(false)))),
        bn_(register_module("bn", torch::nn::BatchNorm2d(channels))) {}
  torch::Tensor forward(torch::Tensor x) { return torch::relu(bn_->forward(conv_->forward(x))); }

 private:
  torch::nn::Conv2d conv_;
  torch::nn::BatchNorm2d bn_;
};
TORCH_MODULE(UniformBlock);

std::string g_model = "embedder";
int g_blocks = 1;
std::vector<int> g_widths = {32, 64, 128};
int g_uniform_blocks = 8;
int64_t g_channels = 64;
int64_t g_size = 16;

// The model as an ordered list of layers (what a stage takes a slice of)
// and the loss on its output.
struct Model {
  models::Embedder net{nullptr};  // --model embedder: owns the layers
  torch::nn::Sequential layers;
  std::shared_ptr<models::LossModuleImpl> loss;

  torch::Tensor forward(const torch::Tensor& x) { return layers->forward(x); }
  torch::nn::Sequential Slice(int64_t begin, int64_t end) const {
    torch::nn::Sequential slice;
    for (int64_t i = begin; i < end; ++i) slice->push_back(std::to_string(i), layers->begin()[i]);
    return slice;
  }
};

std::string ModelText() {
  if (g_model == "uniform") {
    return std::to_string(g_uniform_blocks) + " identical blocks (conv 3x3 " + std::to_string(g_channels) + "x" +
           std::to_string(g_channels) + " at " + std::to_string(g_size) + "x" + std::to_string(g_size) +
           ", BatchNorm, ReLU) between an input BatchNorm and a pooling head";
  }
  std::string w;
  for (int x : g_widths) w += (w.empty() ? "" : "-") + std::to_string(x);
  return "embedder " + w + " (" + std::to_string(g_blocks) + " block(s) per width)";
}

Model MakeModel() {
  torch::manual_seed(1);
  Model m;
  int64_t dim = 128;
  if (g_model == "uniform") {
    // A BatchNorm of the input first, so that every block computes the
    // gradient of its input (the first layer of stage 0 does not need it)
    // and the blocks cost the same on every stage.
    m.layers->push_back(torch::nn::BatchNorm2d(g_channels));
    for (int i = 0; i < g_uniform_blocks; ++i) m.layers->push_back(UniformBlock(g_channels));
    m.layers->push_back(torch::nn::Functional(
        [](torch::Tensor t) { return torch::nn::functional::normalize(t.mean({2, 3})); }));
    dim = g_channels;
  } else {
    ModelConfig mc;
    mc.set_name("resnet_embedder");
    mc.set_embedding_dim(128);
    for (int w : g_widths) mc.add_widths(w);
    mc.set_blocks_per_stage(g_blocks);
    Check(models::BuildEmbedder(mc, &m.net), "embedder");
    m.layers = m.net->layers();
  }
  LossConfig lc;
  lc.set_name("arcface");
  Check(models::BuildLoss(lc, dim, 10, &m.loss), "loss");
  return m;
}

// One panel of the timeline: a row per stage, a box per forward (blue) and
// backward (orange) with its micro-batch number, at measured times.
std::string TimelineSvg(const torch::Tensor& ops, const std::string& title, double y0) {
  const int64_t stages = ops.size(0), n = ops.size(1);
  double t0 = 1e300, t1 = -1e300;
  for (int64_t s = 0; s < stages; ++s) {
    for (int64_t k = 0; k < n; ++k) {
      t0 = std::min(t0, ops[s][k][2].item<double>());
      t1 = std::max(t1, ops[s][k][3].item<double>());
    }
  }
  const double left = 70, width = 760, scale = width / std::max(t1 - t0, 1e-9);
  char buf[512];
  std::string out;
  std::snprintf(buf, sizeof buf, "<text x=\"%.0f\" y=\"%.0f\" font-weight=\"bold\">%s (%.0f ms)</text>\n", left,
                y0 + 12, title.c_str(), 1e3 * (t1 - t0));
  out += buf;
  for (int64_t s = 0; s < stages; ++s) {
    const double y = y0 + 20 + 30.0 * static_cast<double>(s);
    std::snprintf(buf, sizeof buf, "<text x=\"5\" y=\"%.0f\">stage %lld</text>\n", y + 16, static_cast<long long>(s));
    out += buf;
    for (int64_t k = 0; k < n; ++k) {
      const bool fwd = ops[s][k][0].item<double>() > 0.5;
      const double x = left + (ops[s][k][2].item<double>() - t0) * scale;
      const double w = std::max(1.0, (ops[s][k][3].item<double>() - ops[s][k][2].item<double>()) * scale);
      std::snprintf(buf, sizeof buf,
                    "<rect x=\"%.1f\" y=\"%.0f\" width=\"%.1f\" height=\"24\" fill=\"%s\" stroke=\"black\" "
                    "stroke-width=\"0.5\"/><text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%s%d</text>\n",
                    x, y, w, fwd ? "#7fb3e6" : "#f2b36b", x + w / 2, y + 16, fwd ? "F" : "B",
                    static_cast<int>(ops[s][k][1].item<double>()));
      out += buf;
    }
  }
  return out;
}

// The mean delay, in ms, between an operation becoming possible (its
// stage's previous operation ended and, for a forward on stage s > 0, stage
// s-1 ended that micro-batch's forward; for a backward on stage s < S-1,
// stage s+1 ended its backward) and its start, over the operations that
// wait for a neighbour: what the transfers and the wake-ups add, per
// message, beyond the schedule itself. From one mini-batch's timeline
// (ops: [stage][op][forward, micro-batch, start s, end s]).
double MeanHandOffMs(const torch::Tensor& ops) {
  const int64_t stages = ops.size(0), n = ops.size(1);
  auto end_of = [&](int64_t s, bool forward, int mb) {
    for (int64_t k = 0; k < n; ++k) {
      if ((ops[s][k][0].item<double>() > 0.5) == forward && static_cast<int>(ops[s][k][1].item<double>()) == mb) {
        return ops[s][k][3].item<double>();
      }
    }
    return -1.0;
  };
  double sum = 0;
  int count = 0;
  for (int64_t s = 0; s < stages; ++s) {
    for (int64_t k = 0; k < n; ++k) {
      const bool forward = ops[s][k][0].item<double>() > 0.5;
      const int mb = static_cast<int>(ops[s][k][1].item<double>());
      if ((forward && s == 0) || (!forward && s == stages - 1)) continue;
      const double dep = end_of(forward ? s - 1 : s + 1, forward, mb);
      const double prev = k > 0 ? ops[s][k - 1][3].item<double>() : -1e300;
      sum += std::max(0.0, ops[s][k][2].item<double>() - std::max(dep, prev));
      ++count;
    }
  }
  return count ? 1e3 * sum / count : 0.0;
}

// Each stage's idle fraction if every forward on stage s took fwd_ms[s],
// every backward bwd_ms[s], and messages arrived at once: the bubble the
// schedule itself leaves with the stage times measured in the run (equal
// times give the theory (S-1)/(M+S-1); unequal ones leave the faster stage
// idle longer). The measured idle fraction minus this one is what the
// transfers, the wake-ups and the step's own overhead add.
std::vector<double> ScheduleIdle(PipelineConfig::Schedule kind, int micro, const std::vector<double>& fwd_ms,
                                 const std::vector<double>& bwd_ms) {
  const int stages = static_cast<int>(fwd_ms.size());
  std::vector<std::vector<pipeline::Op>> ops;
  for (int s = 0; s < stages; ++s) ops.push_back(pipeline::Schedule(kind, stages, s, micro));
  std::vector<size_t> next(static_cast<size_t>(stages), 0);
  std::vector<double> clock(static_cast<size_t>(stages), 0.0);
  std::map<std::tuple<int, bool, int>, double> end;  // (stage, forward, micro-batch) -> end time
  for (bool progressed = true; progressed;) {
    progressed = false;
    for (int s = 0; s < stages; ++s) {
      const auto su = static_cast<size_t>(s);
      while (next[su] < ops[su].size()) {
        const pipeline::Op& op = ops[su][next[su]];
        double ready = clock[su];
        const bool needs_neighbour = op.forward ? s > 0 : s < stages - 1;
        if (needs_neighbour) {
          const auto it = end.find({op.forward ? s - 1 : s + 1, op.forward, op.micro_batch});
          if (it == end.end()) break;
          ready = std::max(ready, it->second);
        }
        clock[su] = ready + (op.forward ? fwd_ms[su] : bwd_ms[su]);
        end[{s, op.forward, op.micro_batch}] = clock[su];
        ++next[su];
        progressed = true;
      }
    }
  }
  const double makespan = *std::max_element(clock.begin(), clock.end());
  std::vector<double> idle;
  for (int s = 0; s < stages; ++s) {
    const auto su = static_cast<size_t>(s);
    idle.push_back(makespan > 0 ? 1.0 - micro * (fwd_ms[su] + bwd_ms[su]) / makespan : 0.0);
  }
  return idle;
}

// ScheduleIdle for the stage times in `all` (measure_pipeline's columns 4
// and 5).
std::vector<double> ScheduleIdleOf(PipelineConfig::Schedule kind, int micro, const torch::Tensor& all) {
  std::vector<double> fwd, bwd;
  for (int64_t s = 0; s < all.size(0); ++s) {
    fwd.push_back(all[s][4].item<double>());
    bwd.push_back(all[s][5].item<double>());
  }
  return ScheduleIdle(kind, micro, fwd, bwd);
}

std::string Joined(const std::vector<double>& v) {
  std::string t;
  for (double x : v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "%s%.2f", t.empty() ? "" : "/", x);
    t += buf;
  }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_pipeline: GPipe vs 1F1B on MPI ranks (one stage each), beside one process"};
  int64_t batch = 128;
  int steps = 6;
  std::string out = "bench/results/pipeline.json";
  std::string svg;
  app.add_option("--batch", batch, "mini-batch")->capture_default_str();
  app.add_option("--steps", steps, "timed mini-batches per configuration (after one warm-up)")->capture_default_str();
  app.add_option("--out", out, "JSON output")->capture_default_str();
  app.add_option("--blocks", g_blocks,
                 "residual blocks per width (model.blocks_per_stage): more, finer layers let the partition balance")
      ->capture_default_str();
  app.add_option("--svg", svg, "write the measured timeline of GPipe and 1F1B (M = 4) to this SVG file");
  int rounds = 5;
  app.add_option("--rounds", rounds,
                 "paired rounds for the throughput goal: one process alone, then M = 8 GPipe and 1F1B, each round")
      ->capture_default_str();
  app.add_option("--widths", g_widths,
                 "channel widths of the embedder (model.widths); 40,64,128 cuts into two stages of equal cost")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--model", g_model,
                 "embedder: the default embedder (--widths, --blocks); uniform: --uniform-blocks identical conv "
                 "blocks and a pooling head, a model every even cut balances")
      ->check(CLI::IsMember({"embedder", "uniform"}))
      ->capture_default_str();
  app.add_option("--uniform-blocks", g_uniform_blocks, "--model uniform: number of blocks")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  app.add_option("--channels", g_channels, "--model uniform: channels of every block (and the embedding)")
      ->check(CLI::Range(2, 1024))
      ->capture_default_str();
  app.add_option("--size", g_size, "--model uniform: input height and width")
      ->check(CLI::Range(1, 512))
      ->capture_default_str();
  collective::MpiCollectiveOptions co;
  app.add_option("--spin-us", co.spin_us, "point-to-point thread: busy-poll this long after progress")
      ->capture_default_str();
  app.add_option("--max-sleep-us", co.max_sleep_us, "point-to-point thread: longest sleep between polls")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  Check(collective::MpiRuntime::Init(), "MPI");
  co.timeout = std::chrono::seconds(300);
  std::unique_ptr<collective::MpiCollective> comm;
  Check(collective::MpiCollective::Create(co, &comm), "collective");
  const int stages = comm->size(), stage = comm->rank();
  torch::set_num_threads(1);
  torch::manual_seed(7);
  const torch::Tensor x = g_model == "uniform" ? torch::randn({batch, g_channels, g_size, g_size})
                                                : torch::randn({batch, 1, 28, 28});
  const torch::Tensor y = torch::randint(0, 10, {batch}, torch::kInt64);
  nlohmann::json rows = nlohmann::json::array();

  // The reference: one process, the whole model, the whole mini-batch, with
  // 1 and 2 threads; measured before and after the pipelines (the other rank
  // idles meanwhile), and the two measurements averaged, so a slow stretch
  // of the shared machine weighs on both sides.
  double ref_ips = 0, ref2_ips = 0;
  std::vector<double> ref_runs, ref2_runs;
  int64_t ref_bytes = 0;
  auto measure_reference = [&] {
    Model m = MakeModel();
    const auto mb = [&] {
      const auto t0 = Clock::now();
      for (auto& p : m.layers->parameters()) p.mutable_grad() = torch::Tensor();
      m.loss->Compute(m.forward(x), y).loss.backward();
      return std::chrono::duration<double>(Clock::now() - t0).count();
    };
    for (int threads : {1, 2}) {
      torch::set_num_threads(threads);
      mb();
      double secs = 0;
      for (int s = 0; s < steps; ++s) secs += mb();
      (threads == 1 ? ref_runs : ref2_runs).push_back(static_cast<double>(batch * steps) / secs);
    }
    torch::set_num_threads(1);
    ref_ips = ref2_ips = 0;
    for (double v : ref_runs) ref_ips += v / static_cast<double>(ref_runs.size());
    for (double v : ref2_runs) ref2_ips += v / static_cast<double>(ref2_runs.size());
  };
  if (stage == 0) {
    measure_reference();
    Model m = MakeModel();
    // Activation memory of the whole mini-batch's forward (the same heap
    // measure as the stages'): one micro-batch of B through one stage.
    pipeline::StageOptions o;
    o.micro_batches = 1;
    pipeline::StageExecutor whole(m.Slice(0, static_cast<int64_t>(m.layers->size())), nullptr, o);
    pipeline::StageStats st;
    Check(whole.RunMiniBatch(x, y, batch, [&](const torch::Tensor& e, const torch::Tensor& l) {
      return m.loss->Compute(e, l).loss;
    }, &st), "reference");
    ref_bytes = st.peak_activation_bytes;
    std::printf("pipeline benchmark: %s + ArcFace, mini-batch %lld, %d stage(s) on %d rank(s), 1 thread each\n\n",
                ModelText().c_str(), static_cast<long long>(batch), stages, stages);
    std::printf("one process, whole model: %.0f images/s with 1 thread, %.0f with 2 threads; activations %.1f MB\n\n",
                ref_ips, ref2_ips, ref_bytes / 1e6);
  }
  AwaitRankZero(comm.get());

  // The machine's ceiling for S ranks: every rank trains the whole model on
  // the whole mini-batch at once, one thread each (no communication, no
  // bubble). Their summed images/s over one rank alone bounds any pipeline
  // of S ranks here; on this VM its vCPUs do not scale linearly.
  double concurrent_sum = 0;
  auto measure_concurrent = [&]() -> double {
    Model cm = MakeModel();
    const auto mb = [&] {
      for (auto& p : cm.layers->parameters()) p.mutable_grad() = torch::Tensor();
      cm.loss->Compute(cm.forward(x), y).loss.backward();
    };
    mb();
    Check(comm->Barrier()->Wait(), "barrier");
    const auto t0 = Clock::now();
    for (int s = 0; s < steps; ++s) mb();
    const double mine = static_cast<double>(batch * steps) / std::chrono::duration<double>(Clock::now() - t0).count();
    torch::Tensor all = torch::zeros({stages}, torch::kFloat64);
    Check(comm->AllGather(all, torch::tensor({mine}, torch::kFloat64))->Wait(), "gather");
    return all.sum().item<double>();
  };
  {
    concurrent_sum = measure_concurrent();
    if (stage == 0) {
      std::printf("%d processes training the whole model at once: %.0f images/s in all = %.2fx one alone (the ceiling "
                  "of any %d-rank pipeline on this machine)\n\n",
                  stages, concurrent_sum, concurrent_sum / ref_ips, stages);
    }
  }

  Model m = MakeModel();
  pipeline::Partition part;
  PipelineConfig pc;
  pc.set_stages(stages);
  torch::Tensor cut = torch::zeros({stages}, torch::kInt64);
  if (stage == 0) {
    Check(pipeline::PartitionModel(pc, m.layers, x.slice(0, 0, batch / 4).clone(), &part), "partition");
    for (int s = 0; s < stages; ++s) cut[s] = part.layers_per_stage[static_cast<size_t>(s)];
    std::printf("%s\n", pipeline::DescribePartition(part).c_str());
    std::printf("%-8s %3s %9s %9s %9s %7s  %s\n", "schedule", "M", "images/s", "vs 1x1", "vs 1x2", "bubble",
                "per stage: idle fraction, peak micro-batches alive, activation MB, mean forward and backward ms");
  }
  Check(comm->Broadcast(cut, 0)->Wait(), "partition broadcast");
  part.layers_per_stage.clear();
  for (int s = 0; s < stages; ++s) part.layers_per_stage.push_back(static_cast<int>(cut[s].item<int64_t>()));
  auto loss = [&](const torch::Tensor& e, const torch::Tensor& l) { return m.loss->Compute(e, l).loss; };
  auto stage_options = [&](PipelineConfig::Schedule kind, int micro) {
    pipeline::StageOptions o;
    o.stage = stage;
    o.stages = stages;
    o.prev_rank = stage - 1;
    o.next_rank = stage + 1 < stages ? stage + 1 : -1;
    o.micro_batches = micro;
    o.schedule = kind;
    return o;
  };

  std::string svg_body;
  double svg_y = 10;
  // One configuration: a warm-up mini-batch, then `steps` timed ones.
  // Returns images/s; *all receives every stage's figures (rows: stages;
  // columns: peak micro-batches alive, peak activation bytes, wait s per
  // step, idle fraction, mean forward ms, mean backward ms) and *all_ops
  // every stage's timeline of the last mini-batch.
  auto measure_pipeline = [&](PipelineConfig::Schedule kind, int micro, torch::Tensor* all, torch::Tensor* all_ops) {
    pipeline::StageExecutor exec(m.Slice(part.begin(stage), part.end(stage)), comm.get(), stage_options(kind, micro));
    pipeline::StageStats st;
    Check(exec.RunMiniBatch(x, y, batch, loss, &st), "warm-up");
    Check(comm->Barrier()->Wait(), "barrier");
    const auto t0 = Clock::now();
    double wait = 0, busy = 0, fwd = 0, bwd = 0;
    int peak = 0;
    int64_t bytes = 0;
    for (int s = 0; s < steps; ++s) {
      for (auto& p : m.layers->parameters()) p.mutable_grad() = torch::Tensor();
      Check(exec.RunMiniBatch(x, y, batch, loss, &st), "step");
      wait += st.wait_s;
      for (const auto& op : st.timeline) {
        busy += op.end_s - op.start_s;
        (op.forward ? fwd : bwd) += op.end_s - op.start_s;
      }
      peak = std::max(peak, st.peak_in_flight);
      bytes = std::max(bytes, st.peak_activation_bytes);
    }
    Check(comm->Barrier()->Wait(), "barrier");
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    // Every stage's figures to every rank.
    const double ops_per_kind = static_cast<double>(steps) * micro / 1e3;  // in ms
    torch::Tensor mine = torch::tensor({static_cast<double>(peak), static_cast<double>(bytes), wait / steps,
                                        1.0 - busy / secs, fwd / ops_per_kind, bwd / ops_per_kind},
                                       torch::kFloat64);
    *all = torch::zeros({stages, 6}, torch::kFloat64);
    Check(comm->AllGather(*all, mine)->Wait(), "gather");
    torch::Tensor ops = torch::zeros({2 * micro, 4}, torch::kFloat64);
    for (size_t k = 0; k < st.timeline.size(); ++k) {
      ops[static_cast<int64_t>(k)][0] = st.timeline[k].forward ? 1.0 : 0.0;
      ops[static_cast<int64_t>(k)][1] = st.timeline[k].micro_batch;
      ops[static_cast<int64_t>(k)][2] = st.timeline[k].start_s;
      ops[static_cast<int64_t>(k)][3] = st.timeline[k].end_s;
    }
    *all_ops = torch::zeros({stages, 2 * micro, 4}, torch::kFloat64);
    Check(comm->AllGather(*all_ops, ops)->Wait(), "timeline gather");
    return static_cast<double>(batch * steps) / secs;
  };

  for (auto kind : {PipelineConfig::GPIPE, PipelineConfig::ONE_F_ONE_B}) {
    for (int micro : {1, 2, 4, 8}) {
      torch::Tensor all, all_ops;
      const double ips = measure_pipeline(kind, micro, &all, &all_ops);
      if (stage == 0 && micro == 4) {
        svg_body += TimelineSvg(all_ops, kind == PipelineConfig::GPIPE ? "GPipe, M = 4" : "1F1B, M = 4", svg_y);
        svg_y += 40.0 + 30.0 * stages;
      }
      if (stage == 0) {
        const double bubble = static_cast<double>(stages - 1) / static_cast<double>(micro + stages - 1);
        std::string per;
        nlohmann::json st_rows = nlohmann::json::array();
        for (int s = 0; s < stages; ++s) {
          char buf[128];
          std::snprintf(buf, sizeof buf, "%s%d: %.2f, %.0f, %.1f MB, F %.1f B %.1f ms", s ? "; " : "", s,
                        all[s][3].item<double>(), all[s][0].item<double>(), all[s][1].item<double>() / 1e6,
                        all[s][4].item<double>(), all[s][5].item<double>());
          per += buf;
          st_rows.push_back({{"stage", s},
                             {"idle_fraction", all[s][3].item<double>()},
                             {"peak_micro_batches", all[s][0].item<double>()},
                             {"peak_activation_mb", all[s][1].item<double>() / 1e6},
                             {"wait_s_per_step", all[s][2].item<double>()},
                             {"forward_ms_per_micro_batch", all[s][4].item<double>()},
                             {"backward_ms_per_micro_batch", all[s][5].item<double>()}});
        }
        const char* name = kind == PipelineConfig::GPIPE ? "GPipe" : "1F1B";
        const double hand_off = MeanHandOffMs(all_ops);
        const std::vector<double> sched_idle = ScheduleIdleOf(kind, micro, all);
        std::printf("%-8s %3d %9.0f %9.2f %9.2f %7.2f  %s; schedule alone %s; hand-off %.2f ms\n", name, micro, ips,
                    ips / ref_ips, ips / ref2_ips, bubble, per.c_str(), Joined(sched_idle).c_str(), hand_off);
        rows.push_back({{"schedule", name},
                        {"micro_batches", micro},
                        {"images_per_sec", ips},
                        {"vs_one_process_one_thread", ips / ref_ips},
                        {"vs_one_process_two_threads", ips / ref2_ips},
                        {"bubble_theory", bubble},
                        {"mean_hand_off_ms", hand_off},
                        {"schedule_idle_for_measured_stage_times", sched_idle},
                        {"stages", st_rows}});
      }
    }
  }
  // Paired rounds for the throughput goal (M = 8 against one process with one
  // thread): the machine is shared and its speed drifts by tens of percent
  // within minutes, so each round measures the reference and then the two
  // pipelines back to back, and the goal is judged on the median of the
  // rounds' ratios.
  std::vector<double> round_ref, round_gpipe, round_1f1b, round_ceiling;
  std::vector<std::vector<double>> round_idle_gpipe, round_idle_1f1b;    // [stage][round], M = 8
  std::vector<std::vector<double>> round_sched_gpipe, round_sched_1f1b;  // ScheduleIdle of the same
  for (int r = 0; r < rounds; ++r) {
    if (stage == 0) {
      Model rm = MakeModel();
      const auto mb = [&] {
        for (auto& p : rm.layers->parameters()) p.mutable_grad() = torch::Tensor();
        rm.loss->Compute(rm.forward(x), y).loss.backward();
      };
      mb();
      const auto t0 = Clock::now();
      for (int s = 0; s < steps; ++s) mb();
      round_ref.push_back(static_cast<double>(batch * steps) / std::chrono::duration<double>(Clock::now() - t0).count());
    }
    AwaitRankZero(comm.get());
    const double together = measure_concurrent();
    if (stage == 0) round_ceiling.push_back(together / round_ref.back());
    for (auto kind : {PipelineConfig::GPIPE, PipelineConfig::ONE_F_ONE_B}) {
      torch::Tensor all, all_ops;
      const double ips = measure_pipeline(kind, 8, &all, &all_ops);
      auto& idle = kind == PipelineConfig::GPIPE ? round_idle_gpipe : round_idle_1f1b;
      auto& sched = kind == PipelineConfig::GPIPE ? round_sched_gpipe : round_sched_1f1b;
      idle.resize(static_cast<size_t>(stages));
      sched.resize(static_cast<size_t>(stages));
      const std::vector<double> sched_idle = ScheduleIdleOf(kind, 8, all);
      for (int s = 0; s < stages; ++s) {
        idle[static_cast<size_t>(s)].push_back(all[s][3].item<double>());
        sched[static_cast<size_t>(s)].push_back(sched_idle[static_cast<size_t>(s)]);
      }
      if (stage == 0) (kind == PipelineConfig::GPIPE ? round_gpipe : round_1f1b).push_back(ips / round_ref.back());
    }
  }
  const auto median = dtrain::bench::Median;
  auto medians = [&](const std::vector<std::vector<double>>& v) {
    std::vector<double> out;
    for (const auto& x : v) out.push_back(median(x));
    return out;
  };
  if (stage == 0 && rounds > 0) {
    std::printf("\nthroughput rounds (M = 8 against one process with 1 thread, measured back to back):\n");
    // Idle fractions of the stages at M = 8, "s0/s1/...": measured, and in
    // brackets what the schedule alone leaves with that round's stage times.
    auto idle_text = [&](const std::vector<std::vector<double>>& idle, const std::vector<std::vector<double>>& sched,
                         int r) {
      std::vector<double> a, b;
      for (const auto& per_stage : idle) a.push_back(r < 0 ? median(per_stage) : per_stage[static_cast<size_t>(r)]);
      for (const auto& per_stage : sched) b.push_back(r < 0 ? median(per_stage) : per_stage[static_cast<size_t>(r)]);
      return Joined(a) + " (" + Joined(b) + ")";
    };
    std::printf("%6s %12s %9s %8s %8s   %-22s %-22s\n", "round", "1 proc img/s", "ceiling", "GPipe", "1F1B",
                "idle GPipe", "idle 1F1B");
    for (int r = 0; r < rounds; ++r) {
      std::printf("%6d %12.0f %9.2f %8.2f %8.2f   %-22s %-22s\n", r + 1, round_ref[r], round_ceiling[r], round_gpipe[r],
                  round_1f1b[r], idle_text(round_idle_gpipe, round_sched_gpipe, r).c_str(),
                  idle_text(round_idle_1f1b, round_sched_1f1b, r).c_str());
    }
    std::printf("%6s %12.0f %9.2f %8.2f %8.2f   %-22s %-22s\n", "median", median(round_ref), median(round_ceiling),
                median(round_gpipe), median(round_1f1b), idle_text(round_idle_gpipe, round_sched_gpipe, -1).c_str(),
                idle_text(round_idle_1f1b, round_sched_1f1b, -1).c_str());
    std::printf("(idle: each stage's idle fraction, and in brackets the schedule's own for the stage times measured "
                "in that round; bubble theory %.2f)\n", static_cast<double>(stages - 1) / (8.0 + stages - 1));
    std::printf("(ceiling: %d processes each training the whole model at once, over one alone)\n", stages);
  }

  // The reference again; the rows' ratios use the mean of both.
  if (stage == 0) {
    const double first = ref_ips;
    measure_reference();
    std::printf("\none process again: %.0f images/s with 1 thread (%.0f before), %.0f with 2 threads; ratios below "
                "use the means\n",
                ref_runs.back(), first, ref2_runs.back());
    for (auto& r : rows) {
      const double ips = r["images_per_sec"].get<double>();
      r["vs_one_process_one_thread"] = ips / ref_ips;
      r["vs_one_process_two_threads"] = ips / ref2_ips;
    }
    std::printf("%-8s %3s %9s %9s\n", "schedule", "M", "vs 1x1", "vs 1x2");
    for (const auto& r : rows) {
      std::printf("%-8s %3d %9.2f %9.2f\n", r["schedule"].get<std::string>().c_str(), r["micro_batches"].get<int>(),
                  r["vs_one_process_one_thread"].get<double>(), r["vs_one_process_two_threads"].get<double>());
    }
  }
  AwaitRankZero(comm.get());
  if (stage == 0) {
    nlohmann::json j = {{"bench", "pipeline"},
                        {"batch", batch},
                        {"model", ModelText()},
                        {"blocks_per_width", g_blocks},
                        {"widths", g_widths},
                        {"partition", part.layers_per_stage},
                        {"one_process_images_per_sec_runs", ref_runs},
                        {"all_ranks_whole_model_at_once_images_per_sec", concurrent_sum},
                        {"ceiling_vs_one_process_one_thread", concurrent_sum / ref_ips},
                        {"rounds",
                         {{"one_process_images_per_sec", round_ref},
                          {"ceiling_vs_one_process", round_ceiling},
                          {"median_ceiling_vs_one_process", median(round_ceiling)},
                          {"gpipe_m8_vs_one_process", round_gpipe},
                          {"one_f_one_b_m8_vs_one_process", round_1f1b},
                          {"median_gpipe_m8_vs_one_process", median(round_gpipe)},
                          {"median_one_f_one_b_m8_vs_one_process", median(round_1f1b)},
                          {"gpipe_m8_idle_fraction_per_stage", round_idle_gpipe},
                          {"one_f_one_b_m8_idle_fraction_per_stage", round_idle_1f1b},
                          {"median_gpipe_m8_idle_fraction_per_stage", medians(round_idle_gpipe)},
                          {"median_one_f_one_b_m8_idle_fraction_per_stage", medians(round_idle_1f1b)},
                          {"gpipe_m8_schedule_idle_for_measured_stage_times", round_sched_gpipe},
                          {"one_f_one_b_m8_schedule_idle_for_measured_stage_times", round_sched_1f1b},
                          {"bubble_theory_m8", static_cast<double>(stages - 1) / (8.0 + stages - 1)}}},
                        {"one_process_two_threads_images_per_sec_runs", ref2_runs},
                        {"steps", steps},
                        {"stages", stages},
                        {"threads_per_rank", 1},
                        {"one_process_images_per_sec", ref_ips},
                        {"one_process_two_threads_images_per_sec", ref2_ips},
                        {"one_process_activation_mb", ref_bytes / 1e6},
                        {"rows", rows}};
    std::filesystem::create_directories(std::filesystem::path(out).parent_path());
    std::ofstream(out) << j.dump(1) << "\n";
    std::printf("\nwritten to %s\n", out.c_str());
    if (!svg.empty()) {
      std::ofstream f(svg);
      f << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"860\" height=\"" << svg_y + 10
        << "\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        << svg_body << "</svg>\n";
      std::printf("timeline written to %s\n", svg.c_str());
    }
  }
  collective::MpiRuntime::Finalize();
  return 0;
}
