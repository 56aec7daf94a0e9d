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
// 40-64-128 the best cut into two stages has equal cost (a balanced
// partition, which the bubble goal is about).
//
//   launch/mpirun.sh -n 2 -- build/bin/bench_pipeline [--batch 128] [--steps 6] [--widths 32,64,128]
//                                                     [--out FILE] [--svg FILE]
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

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

struct Model {
  models::Embedder net{nullptr};
  std::shared_ptr<models::LossModuleImpl> loss;
};

int g_blocks = 1;
std::vector<int> g_widths = {32, 64, 128};

std::string WidthsText() {
  std::string w;
  for (int x : g_widths) w += (w.empty() ? "" : "-") + std::to_string(x);
  return w;
}

Model MakeModel() {
  torch::manual_seed(1);
  ModelConfig mc;
  mc.set_name("resnet_embedder");
  mc.set_embedding_dim(128);
  for (int w : g_widths) mc.add_widths(w);
  mc.set_blocks_per_stage(g_blocks);
  Model m;
  Check(models::BuildEmbedder(mc, &m.net), "embedder");
  LossConfig lc;
  lc.set_name("arcface");
  Check(models::BuildLoss(lc, 128, 10, &m.loss), "loss");
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
  CLI11_PARSE(app, argc, argv);
  Check(collective::MpiRuntime::Init(), "MPI");
  collective::MpiCollectiveOptions co;
  co.timeout = std::chrono::seconds(300);
  std::unique_ptr<collective::MpiCollective> comm;
  Check(collective::MpiCollective::Create(co, &comm), "collective");
  const int stages = comm->size(), stage = comm->rank();
  torch::set_num_threads(1);
  torch::manual_seed(7);
  const torch::Tensor x = torch::randn({batch, 1, 28, 28});
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
      for (auto& p : m.net->parameters()) p.mutable_grad() = torch::Tensor();
      m.loss->Compute(m.net->forward(x), y).loss.backward();
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
    pipeline::StageExecutor whole(m.net->SliceLayers(0, static_cast<int64_t>(m.net->layers()->size())), nullptr, o);
    pipeline::StageStats st;
    Check(whole.RunMiniBatch(x, y, batch, [&](const torch::Tensor& e, const torch::Tensor& l) {
      return m.loss->Compute(e, l).loss;
    }, &st), "reference");
    ref_bytes = st.peak_activation_bytes;
    std::printf("pipeline benchmark: embedder %s (%d block(s) per width) + ArcFace, mini-batch %lld, "
                "%d stage(s) on %d rank(s), 1 thread each\n\n",
                WidthsText().c_str(), g_blocks, static_cast<long long>(batch), stages, stages);
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
      for (auto& p : cm.net->parameters()) p.mutable_grad() = torch::Tensor();
      cm.loss->Compute(cm.net->forward(x), y).loss.backward();
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
    Check(pipeline::PartitionModel(pc, m.net->layers(), torch::randn({batch / 4, 1, 28, 28}), &part), "partition");
    for (int s = 0; s < stages; ++s) cut[s] = part.layers_per_stage[static_cast<size_t>(s)];
    std::printf("%s\n", pipeline::DescribePartition(part).c_str());
    std::printf("%-8s %3s %9s %9s %9s %7s  %s\n", "schedule", "M", "images/s", "vs 1x1", "vs 1x2", "bubble",
                "per stage: idle fraction, peak micro-batches alive, activation MB");
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
  for (auto kind : {PipelineConfig::GPIPE, PipelineConfig::ONE_F_ONE_B}) {
    for (int micro : {1, 2, 4, 8}) {
      pipeline::StageExecutor exec(m.net->SliceLayers(part.begin(stage), part.end(stage)), comm.get(),
                                   stage_options(kind, micro));
      pipeline::StageStats st;
      Check(exec.RunMiniBatch(x, y, batch, loss, &st), "warm-up");
      Check(comm->Barrier()->Wait(), "barrier");
      const auto t0 = Clock::now();
      double wait = 0, busy = 0;
      int peak = 0;
      int64_t bytes = 0;
      for (int s = 0; s < steps; ++s) {
        for (auto& p : m.net->parameters()) p.mutable_grad() = torch::Tensor();
        Check(exec.RunMiniBatch(x, y, batch, loss, &st), "step");
        wait += st.wait_s;
        for (const auto& op : st.timeline) busy += op.end_s - op.start_s;
        peak = std::max(peak, st.peak_in_flight);
        bytes = std::max(bytes, st.peak_activation_bytes);
      }
      Check(comm->Barrier()->Wait(), "barrier");
      const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
      // Every stage's figures to rank 0.
      torch::Tensor mine = torch::tensor(
          {static_cast<double>(peak), static_cast<double>(bytes), wait / steps, 1.0 - busy / secs}, torch::kFloat64);
      torch::Tensor all = torch::zeros({stages, 4}, torch::kFloat64);
      Check(comm->AllGather(all, mine)->Wait(), "gather");
      // The last mini-batch's timeline of every stage, for the picture.
      torch::Tensor ops = torch::zeros({2 * micro, 4}, torch::kFloat64);
      for (size_t k = 0; k < st.timeline.size(); ++k) {
        ops[static_cast<int64_t>(k)][0] = st.timeline[k].forward ? 1.0 : 0.0;
        ops[static_cast<int64_t>(k)][1] = st.timeline[k].micro_batch;
        ops[static_cast<int64_t>(k)][2] = st.timeline[k].start_s;
        ops[static_cast<int64_t>(k)][3] = st.timeline[k].end_s;
      }
      torch::Tensor all_ops = torch::zeros({stages, 2 * micro, 4}, torch::kFloat64);
      Check(comm->AllGather(all_ops, ops)->Wait(), "timeline gather");
      if (stage == 0 && micro == 4) {
        svg_body += TimelineSvg(all_ops, kind == PipelineConfig::GPIPE ? "GPipe, M = 4" : "1F1B, M = 4", svg_y);
        svg_y += 40.0 + 30.0 * stages;
      }
      if (stage == 0) {
        const double ips = static_cast<double>(batch * steps) / secs;
        const double bubble = static_cast<double>(stages - 1) / static_cast<double>(micro + stages - 1);
        std::string per;
        nlohmann::json st_rows = nlohmann::json::array();
        for (int s = 0; s < stages; ++s) {
          char buf[96];
          std::snprintf(buf, sizeof buf, "%s%d: %.2f, %.0f, %.1f MB", s ? "; " : "", s, all[s][3].item<double>(),
                        all[s][0].item<double>(), all[s][1].item<double>() / 1e6);
          per += buf;
          st_rows.push_back({{"stage", s},
                             {"idle_fraction", all[s][3].item<double>()},
                             {"peak_micro_batches", all[s][0].item<double>()},
                             {"peak_activation_mb", all[s][1].item<double>() / 1e6},
                             {"wait_s_per_step", all[s][2].item<double>()}});
        }
        const char* name = kind == PipelineConfig::GPIPE ? "GPipe" : "1F1B";
        std::printf("%-8s %3d %9.0f %9.2f %9.2f %7.2f  %s\n", name, micro, ips, ips / ref_ips, ips / ref2_ips, bubble,
                    per.c_str());
        rows.push_back({{"schedule", name},
                        {"micro_batches", micro},
                        {"images_per_sec", ips},
                        {"vs_one_process_one_thread", ips / ref_ips},
                        {"vs_one_process_two_threads", ips / ref2_ips},
                        {"bubble_theory", bubble},
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
  for (int r = 0; r < rounds; ++r) {
    if (stage == 0) {
      Model rm = MakeModel();
      const auto mb = [&] {
        for (auto& p : rm.net->parameters()) p.mutable_grad() = torch::Tensor();
        rm.loss->Compute(rm.net->forward(x), y).loss.backward();
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
      pipeline::StageExecutor exec(m.net->SliceLayers(part.begin(stage), part.end(stage)), comm.get(),
                                   stage_options(kind, 8));
      pipeline::StageStats st;
      Check(exec.RunMiniBatch(x, y, batch, loss, &st), "warm-up");
      Check(comm->Barrier()->Wait(), "barrier");
      const auto t0 = Clock::now();
      for (int s = 0; s < steps; ++s) {
        for (auto& p : m.net->parameters()) p.mutable_grad() = torch::Tensor();
        Check(exec.RunMiniBatch(x, y, batch, loss, &st), "step");
      }
      Check(comm->Barrier()->Wait(), "barrier");
      const double ips = static_cast<double>(batch * steps) / std::chrono::duration<double>(Clock::now() - t0).count();
      if (stage == 0) (kind == PipelineConfig::GPIPE ? round_gpipe : round_1f1b).push_back(ips / round_ref.back());
    }
  }
  auto median = [](std::vector<double> v) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
  };
  if (stage == 0 && rounds > 0) {
    std::printf("\nthroughput rounds (M = 8 against one process with 1 thread, measured back to back):\n");
    std::printf("%6s %12s %9s %8s %8s\n", "round", "1 proc img/s", "ceiling", "GPipe", "1F1B");
    for (int r = 0; r < rounds; ++r) {
      std::printf("%6d %12.0f %9.2f %8.2f %8.2f\n", r + 1, round_ref[r], round_ceiling[r], round_gpipe[r], round_1f1b[r]);
    }
    std::printf("%6s %12.0f %9.2f %8.2f %8.2f\n", "median", median(round_ref), median(round_ceiling), median(round_gpipe),
                median(round_1f1b));
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
                          {"median_one_f_one_b_m8_vs_one_process", median(round_1f1b)}}},
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
