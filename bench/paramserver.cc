// bench/paramserver: push + pull throughput of the parameter-server service on
// loopback, beside a raw TCP transfer of the same bytes measured in the same
// run.
//
// Model: --tensors float32 tensors of --tensor-mb MiB each (default 8 x 4 MiB).
// One "update" is what an async worker does per step: push the gradients of
// every tensor to the shards, then pull the parameters that changed. W
// workers (threads, each with its own client) run U updates each against S
// shard servers (in this process, each its own gRPC server); the shards run
// SGD on every push. Throughput counts payload bytes both ways.
//
// Raw TCP: one connection per worker to a plain socket server on 127.0.0.1
// that reads the push bytes and writes the pull bytes back, the same pattern
// and sizes with no serialisation, no optimizer and no copies beyond the
// kernel's. Goal (issue "Asynchronous parameter-server data parallelism"):
// PS throughput >= 50% of raw TCP for 4 MB tensors.
//
// Memory traffic: the table also gives each side's memory traffic, from a
// model of the bytes one update reads and writes (P = the model's bytes):
// raw TCP 8 P (four kernel copies: push send and receive, pull send and
// receive, each reading and writing P); the parameter server 16 P (the same
// four copies, the shard's NaN/Inf check 1 P, SGD with momentum 5 P: read
// gradient, parameters and momentum, write parameters and momentum, and the
// worker's copy of pulled values into its tensors 2 P). Where both are bound
// by memory, PS/TCP is 0.5 x the ratio of the two traffic rates.
//
// Paired rounds (--rounds, default 3): each row measures the parameter
// server, then raw TCP, back to back, R times, and gives the medians (the
// ratio's is the median of the rounds' ratios); this machine's speed drifts
// by 10-20% between runs a minute apart.
//
//   build/bin/bench_paramserver [--tensors 8] [--tensor-mb 4] [--updates 10] [--rounds 3] [--workers 1 2 4]
//                               [--shards 1 2] [--chunk-mb 4] [--apply-threads 2] [--no-tcp] [--out FILE]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "bench_util.h"
#include "dtrain/common/logging.h"
#include "dtrain/paramserver/service.h"

using namespace dtrain::paramserver;
using Clock = std::chrono::steady_clock;

namespace {

void Check(const dtrain::Status& st, const char* what) {
  if (!st.ok()) {
    std::fprintf(stderr, "bench_paramserver: %s: %s\n", what, st.ToString().c_str());
    std::exit(1);
  }
}

bool WriteAll(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, 0);
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool ReadAll(int fd, char* p, size_t n) {
  while (n > 0) {
    ssize_t r = ::recv(fd, p, n, 0);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// W connections; each does `updates` rounds of: send `bytes`, receive `bytes`.
double RawTcpSeconds(int workers, int updates, size_t bytes) {
  int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  ::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
  ::listen(listener, workers);
  std::vector<std::thread> servers;
  for (int w = 0; w < workers; ++w) {
    servers.emplace_back([&] {
      int fd = ::accept(listener, nullptr, nullptr);
      std::vector<char> buf(bytes);
      for (int u = 0; u < updates; ++u) {
        if (!ReadAll(fd, buf.data(), bytes) || !WriteAll(fd, buf.data(), bytes)) break;
      }
      ::close(fd);
    });
  }
  std::vector<int> fds;
  for (int w = 0; w < workers; ++w) {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    fds.push_back(fd);
  }
  const auto t0 = Clock::now();
  std::vector<std::thread> clients;
  for (int w = 0; w < workers; ++w) {
    clients.emplace_back([&, w] {
      std::vector<char> out(bytes, 1), in(bytes);
      for (int u = 0; u < updates; ++u) {
        if (!WriteAll(fds[w], out.data(), bytes) || !ReadAll(fds[w], in.data(), bytes)) break;
      }
    });
  }
  for (auto& t : clients) t.join();
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  for (int fd : fds) ::close(fd);
  for (auto& t : servers) t.join();
  ::close(listener);
  return s;
}

// This machine's memory traffic rate for one thread: bytes read + written
// per second by memcpy of `bytes` between two buffers, the best of 5.
double MemcpyTrafficGbPerS(size_t bytes) {
  std::vector<char> a(bytes, 1), b(bytes, 2);
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = Clock::now();
    std::memcpy(b.data(), a.data(), bytes);
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
    a[r] = b[bytes - 1 - r];  // keep the copies observable
  }
  return 2.0 * static_cast<double>(bytes) / best / 1e9;
}

// One row's paired rounds, and their medians (NaN for raw TCP with --no-tcp).
struct Row {
  int workers = 0, shards = 0;
  std::vector<double> ps_mb_s, tcp_mb_s, updates_s, ratio;
  double ps = 0, tcp = 0, ps_over_tcp = 0, updates = 0;
  void Summarise() {
    ps = dtrain::bench::Median(ps_mb_s);
    updates = dtrain::bench::Median(updates_s);
    tcp = tcp_mb_s.empty() ? std::nan("") : dtrain::bench::Median(tcp_mb_s);
    ps_over_tcp = ratio.empty() ? std::nan("") : dtrain::bench::Median(ratio);
  }
};

std::string Fixed3(double x) {
  char b[32];
  std::snprintf(b, sizeof b, "%.3f", x);
  return b;
}

// Memory traffic per payload byte counted in MB/s (which counts P pushed and
// P pulled per update): 8 P / 2 P for raw TCP, 16 P / 2 P for the parameter
// server (see the top of this file).
constexpr double kTcpTrafficPerPayload = 4, kPsTrafficPerPayload = 8;

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_paramserver: parameter-server push+pull throughput vs raw TCP on loopback", "bench_paramserver"};
  int tensors = 8, updates = 10, rounds = 3;
  double tensor_mb = 4;
  std::string out = "bench/results/paramserver.json";
  app.add_option("--tensors", tensors, "tensors in the model")->capture_default_str();
  app.add_option("--tensor-mb", tensor_mb, "MiB per tensor")->capture_default_str();
  app.add_option("--updates", updates, "push+pull rounds per worker")->capture_default_str();
  app.add_option("--rounds", rounds, "paired rounds per row (parameter server, then raw TCP); the row gives medians")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--out", out, "JSON output")->capture_default_str();
  std::vector<int> worker_counts = {1, 2, 4}, shard_counts = {1, 2};
  app.add_option("--workers", worker_counts, "worker counts to measure")->capture_default_str();
  app.add_option("--shards", shard_counts, "shard counts to measure")->capture_default_str();
  double chunk_mb = 4;
  app.add_option("--chunk-mb", chunk_mb, "MiB per streamed message (push and pull chunks)")->capture_default_str();
  int apply_threads = ShardOptions().apply_threads;
  app.add_option("--apply-threads", apply_threads, "threads that apply one large push on a shard (ShardOptions)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bool no_tcp = false;
  app.add_flag("--no-tcp", no_tcp, "measure the parameter server only (for profiling; no ratio)");
  bool default_malloc = false;
  app.add_flag("--default-malloc", default_malloc,
               "leave glibc malloc's defaults (dtrain-ps and async workers keep transfer buffers in the heap)");
  CLI11_PARSE(app, argc, argv);
  if (!default_malloc) KeepTransferBuffersInTheHeap();
  dtrain::LoggingOptions lo;
  lo.level = "warn";
  Check(dtrain::InitLogging(lo), "logging");

  const int64_t numel = static_cast<int64_t>(tensor_mb * (1 << 20) / 4);
  std::vector<ParamSpec> specs;
  std::map<std::string, std::vector<float>> values;
  for (int t = 0; t < tensors; ++t) {
    const std::string name = "layer" + std::to_string(t) + ".weight";
    specs.push_back({name, numel, 4});
    values[name].assign(static_cast<size_t>(numel), 0.01f * t);
  }
  const size_t model_bytes = static_cast<size_t>(tensors) * static_cast<size_t>(numel) * 4;
  std::printf("bench/paramserver: %d tensors x %.1f MiB (%.1f MiB per push and per pull), %d updates per worker, "
              "%u cores\n\n",
              tensors, tensor_mb, model_bytes / 1048576.0, updates, std::thread::hardware_concurrency());
  const double memcpy_gb_s = MemcpyTrafficGbPerS(model_bytes);
  std::printf("memcpy of %.0f MiB, one thread: %.1f GB/s of memory traffic (read + write)\n\n",
              model_bytes / 1048576.0, memcpy_gb_s);
  std::printf("%8s %7s %12s %12s %10s %10s %14s %15s   %s\n", "workers", "shards", "PS MB/s", "TCP MB/s", "PS/TCP",
              "updates/s", "PS mem GB/s", "TCP mem GB/s", "PS/TCP per round");
  std::vector<Row> rows;
  for (int shards : shard_counts) {
    for (int workers : worker_counts) {
      ShardPlan plan;
      Check(PlanShards(specs, shards, &plan), "plan");
      std::vector<std::unique_ptr<PsServer>> servers;
      std::vector<std::string> addresses;
      for (int s = 0; s < shards; ++s) {
        PsServerOptions o;
        o.shard.shard = s;
        o.shard.slices = plan.shards[s];
        o.shard.optimizer.set_lr(0.01f);  // and the defaults: Nesterov momentum 0.9, weight decay
        o.shard.max_staleness = 1 << 20;
        o.shard.apply_threads = apply_threads;
        o.token = "bench";
        o.threads = 4;
        o.chunk_bytes = static_cast<int64_t>(chunk_mb * (1 << 20));
        std::unique_ptr<PsServer> server;
        Check(PsServer::Start(o, &server), "server");
        addresses.push_back("127.0.0.1:" + std::to_string(server->port()));
        servers.push_back(std::move(server));
      }
      std::vector<std::unique_ptr<PsClient>> clients;
      std::vector<std::map<std::string, std::vector<float>>> params(static_cast<size_t>(workers), values);
      for (int w = 0; w < workers; ++w) {
        PsClientOptions co;
        co.addresses = addresses;
        co.token = "bench";
        co.plan = plan;
        co.chunk_bytes = static_cast<int64_t>(chunk_mb * (1 << 20));
        std::unique_ptr<PsClient> c;
        Check(PsClient::Connect(co, &c), "connect");
        clients.push_back(std::move(c));
      }
      ConstTensors grads;
      for (const auto& [k, v] : values) grads[k] = v.data();
      Check(clients[0]->Init(grads, 0), "init");
      for (int w = 0; w < workers; ++w) {
        Tensors t;
        for (auto& [k, v] : params[w]) t[k] = v.data();
        Check(clients[w]->Pull(t), "first pull");
      }
      // One timed run: every worker does `updates` push + pull rounds.
      auto run_ps = [&](int64_t* moved) {
        std::vector<int64_t> base(static_cast<size_t>(workers));
        for (int w = 0; w < workers; ++w) base[w] = clients[w]->bytes_pushed() + clients[w]->bytes_pulled();
        const auto t0 = Clock::now();
        std::vector<std::thread> threads;
        for (int w = 0; w < workers; ++w) {
          threads.emplace_back([&, w] {
            Tensors t;
            for (auto& [k, v] : params[w]) t[k] = v.data();
            for (int u = 0; u < updates; ++u) {
              Check(clients[w]->Push(grads, nullptr), "push");
              Check(clients[w]->Pull(t), "pull");
            }
          });
        }
        for (auto& t : threads) t.join();
        const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
        *moved = 0;
        for (int w = 0; w < workers; ++w) *moved += clients[w]->bytes_pushed() + clients[w]->bytes_pulled() - base[w];
        return seconds;
      };
      // Paired rounds: the parameter server, then raw TCP, back to back; the
      // row gives the medians (this machine's speed drifts between runs).
      Row r;
      r.workers = workers;
      r.shards = shards;
      const double tcp_bytes = 2.0 * workers * updates * static_cast<double>(model_bytes);
      for (int round = 0; round < rounds; ++round) {
        int64_t moved = 0;
        const double ps_s = run_ps(&moved);
        r.ps_mb_s.push_back(static_cast<double>(moved) / ps_s / 1e6);
        r.updates_s.push_back(workers * updates / ps_s);
        if (no_tcp) continue;
        // The shards stay up, idle, while TCP runs.
        r.tcp_mb_s.push_back(tcp_bytes / RawTcpSeconds(workers, updates, model_bytes) / 1e6);
        r.ratio.push_back(r.ps_mb_s.back() / r.tcp_mb_s.back());
      }
      clients.clear();
      for (auto& s : servers) s->Shutdown();
      r.Summarise();
      std::string each;
      for (double x : r.ratio) each += (each.empty() ? "" : " ") + Fixed3(x);
      std::printf("%8d %7d %12.0f %12.0f %10.3f %10.2f %14.1f %15.1f   %s\n", r.workers, r.shards, r.ps, r.tcp,
                  r.ps_over_tcp, r.updates, r.ps * kPsTrafficPerPayload / 1e3, r.tcp * kTcpTrafficPerPayload / 1e3,
                  each.c_str());
      std::fflush(stdout);
      rows.push_back(r);
    }
  }
  nlohmann::ordered_json j;
  j["bench"] = "paramserver";
  j["tensors"] = tensors;
  j["tensor_mb"] = tensor_mb;
  j["updates_per_worker"] = updates;
  j["cores"] = std::thread::hardware_concurrency();
  j["transfer_buffers_in_heap"] = !default_malloc;
  j["chunk_mb"] = chunk_mb;
  j["apply_threads"] = apply_threads;
  j["memcpy_traffic_gb_per_s"] = memcpy_gb_s;
  j["memory_traffic_model"] =
      "bytes read + written per update, P = model bytes: raw TCP 8 P (4 kernel copies), parameter server 16 P "
      "(4 kernel copies, NaN/Inf check 1 P, SGD momentum 5 P, worker's copy of pulled values 2 P)";
  j["rounds"] = rounds;
  j["row_figures"] = "medians of the paired rounds; the per-round figures follow";
  for (const Row& r : rows) {
    j["rows"].push_back({{"workers", r.workers}, {"shards", r.shards}, {"ps_mb_per_s", r.ps},
                         {"tcp_mb_per_s", r.tcp}, {"ps_over_tcp", r.ps_over_tcp},
                         {"updates_per_s", r.updates},
                         {"ps_memory_traffic_gb_per_s", r.ps * kPsTrafficPerPayload / 1e3},
                         {"tcp_memory_traffic_gb_per_s", r.tcp * kTcpTrafficPerPayload / 1e3},
                         {"rounds_ps_mb_per_s", r.ps_mb_s}, {"rounds_tcp_mb_per_s", r.tcp_mb_s},
                         {"rounds_ps_over_tcp", r.ratio}});
  }
  std::filesystem::create_directories(std::filesystem::path(out).parent_path());
  std::ofstream(out) << j.dump(2) << "\n";
  std::printf("\nwritten to %s\n", out.c_str());
  return 0;
}
