// bench/allreduce: bus bandwidth of Collective::AllReduce (the MPI backend,
// with its communication thread, queue and Work handles) against raw
// MPI_Allreduce on the same buffers, 1 KB to 64 MB, under mpirun.
//
// Goal (issue "Synchronous all-reduce data parallelism"): >= 0.9 of raw at
// >= 1 MB. Bus bandwidth as NCCL's tests define it: bytes x 2(n-1)/n / time.
// Rounds alternate raw and dtrain for each size and the median is kept, so
// both see the same machine noise.
//
//   launch/mpirun.sh -n 2 -- build/bin/bench_allreduce [--out FILE] [--max-mb 64] [--rounds R]
// Rank 0 prints the table and writes FILE (default
// bench/results/allreduce_np<N>.json).
#include <mpi.h>
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "dtrain/worker/collective/mpi_collective.h"

namespace {

using Clock = std::chrono::steady_clock;
using namespace dtrain::collective;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_allreduce: Collective::AllReduce vs raw MPI_Allreduce (run under mpirun)"};
  std::string out;
  int max_mb = 64, rounds = 9;
  app.add_option("--out", out, "JSON file (default bench/results/allreduce_np<N>.json)");
  app.add_option("--max-mb", max_mb, "largest message in MB (default 64)");
  app.add_option("--rounds", rounds, "alternating rounds per size; the median is reported (default 9)");
  CLI11_PARSE(app, argc, argv);
  torch::set_num_threads(1);
  if (!MpiRuntime::Init().ok()) return 1;
  std::unique_ptr<MpiCollective> coll;
  if (!MpiCollective::Create({}, &coll).ok()) return 1;
  const int n = coll->size(), rank = coll->rank();
  if (out.empty()) out = "bench/results/allreduce_np" + std::to_string(n) + ".json";
  const double factor = n > 1 ? 2.0 * (n - 1) / n : 1.0;

  nlohmann::ordered_json rows = nlohmann::json::array();
  if (rank == 0) {
    std::printf("all-reduce (sum, float32) on %d ranks, median of %d rounds; bus bandwidth in GB/s\n", n, rounds);
    std::printf("%10s %8s %12s %12s %12s %12s %8s\n", "bytes", "iters", "raw us", "dtrain us", "raw GB/s",
                "dtrain GB/s", "ratio");
  }
  for (int64_t bytes = 1024; bytes <= (int64_t{max_mb} << 20); bytes *= 4) {
    const int64_t count = bytes / 4;
    torch::Tensor buf = torch::ones({count});
    // Enough iterations for ~50 ms of work per measurement (at least 3).
    const int iters = static_cast<int>(std::clamp<int64_t>((int64_t{64} << 20) / bytes, 3, 200));
    std::vector<double> raw_t, ours_t;
    for (int r = 0; r < rounds; ++r) {
      MPI_Barrier(MPI_COMM_WORLD);
      auto t0 = Clock::now();
      for (int i = 0; i < iters; ++i) {
        MPI_Allreduce(MPI_IN_PLACE, buf.data_ptr<float>(), static_cast<int>(count), MPI_FLOAT, MPI_SUM,
                      MPI_COMM_WORLD);
      }
      raw_t.push_back(std::chrono::duration<double>(Clock::now() - t0).count() / iters);
      buf.fill_(1);
      MPI_Barrier(MPI_COMM_WORLD);
      t0 = Clock::now();
      for (int i = 0; i < iters; ++i) {
        if (!coll->AllReduce(buf, ReduceOp::kSum)->Wait().ok()) return 1;
      }
      ours_t.push_back(std::chrono::duration<double>(Clock::now() - t0).count() / iters);
      buf.fill_(1);
    }
    // Every rank reports rank 0's view; take the slowest rank's median.
    double med[2] = {Median(raw_t), Median(ours_t)}, worst[2];
    MPI_Allreduce(med, worst, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    const double raw_bw = static_cast<double>(bytes) * factor / worst[0] / 1e9;
    const double our_bw = static_cast<double>(bytes) * factor / worst[1] / 1e9;
    if (rank == 0) {
      std::printf("%10lld %8d %12.1f %12.1f %12.3f %12.3f %8.3f\n", static_cast<long long>(bytes), iters,
                  worst[0] * 1e6, worst[1] * 1e6, raw_bw, our_bw, our_bw / raw_bw);
      std::fflush(stdout);
      rows.push_back({{"bytes", bytes}, {"iterations", iters}, {"raw_us", worst[0] * 1e6},
                      {"dtrain_us", worst[1] * 1e6}, {"raw_busbw_gbs", raw_bw}, {"dtrain_busbw_gbs", our_bw},
                      {"ratio", our_bw / raw_bw}});
    }
  }
  if (rank == 0) {
    double min_ratio_1mb = 1e9;
    for (const auto& r : rows) {
      if (r["bytes"].get<int64_t>() >= (1 << 20)) min_ratio_1mb = std::min(min_ratio_1mb, r["ratio"].get<double>());
    }
    std::printf("lowest ratio at >= 1 MB: %.3f (goal >= 0.9)\n", min_ratio_1mb);
    nlohmann::ordered_json j;
    j["benchmark"] = "allreduce";
    j["ranks"] = n;
    j["rounds"] = rounds;
    j["goal"] = "dtrain / raw bus bandwidth >= 0.9 at >= 1 MB";
    j["min_ratio_at_1mb_and_above"] = min_ratio_1mb;
    j["rows"] = rows;
    std::ofstream(out) << j.dump(2) << "\n";
    std::printf("written to %s\n", out.c_str());
  }
  coll.reset();
  MpiRuntime::Finalize();
  return 0;
}
