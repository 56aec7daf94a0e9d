// dtrain-ps: one parameter-server shard of an async job (docs/paramserver.md).
//
// Under mpirun, as the first program of an MPMD line:
//   mpirun -np S dtrain-ps --config JOB : -np N dtrain-worker --config JOB
// shard i is the i-th dtrain-ps rank; the shards publish their addresses to
// the workers (paramserver/mpmd.h) and exit when the last worker is done.
// Alone: dtrain-ps --config JOB --shard I [--port P] [--port-file F] serves
// until SIGTERM or SIGINT.
//
// The shard starts empty: the chief worker's Init brings its slices, values
// and (on a resume) optimizer state. Every call must carry the job token,
// given in DTRAIN_JOB_TOKEN or --token-file.
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>

#include "dtrain/common/config.h"
#include "dtrain/common/env.h"
#include "dtrain/common/logging.h"
#include "dtrain/common/port_file.h"
#include "dtrain/common/rpc.h"
#include "dtrain/coordinator/membership.h"
#include "dtrain/paramserver/mpmd.h"
#include "dtrain/paramserver/service.h"

namespace {

std::atomic<bool> g_stop{false};
// Set when a coordinator started this shard (DTRAIN_COORDINATOR).
std::unique_ptr<dtrain::coordinator::MembershipClient> g_membership;
void OnSignal(int) { g_stop = true; }

bool UnderMpirun() {
  for (const char* name : {dtrain::env::kOmpiWorldSize, dtrain::env::kPmiSize, dtrain::env::kPmixRank}) {
    if (dtrain::env::Get(name, nullptr) != nullptr) return true;
  }
  return false;
}

int Fail(const dtrain::Status& st, bool mpi) {
  if (g_membership) g_membership->Goodbye(st);
  std::fprintf(stderr, "dtrain-ps: %s\n", st.ToString().c_str());
  std::fflush(stderr);
  if (mpi) MPI_Abort(MPI_COMM_WORLD, 1);  // ends the workers too: none waits for a shard that is gone
  return 1;
}

void LogCounters(dtrain::paramserver::PsServer& server) {
  auto shard = server.shard();
  if (!shard) return;
  const dtrain::paramserver::ShardCounters c = shard->counters();
  std::string hist;
  for (const auto& [s, n] : c.staleness_histogram) hist += (hist.empty() ? "" : ", ") + std::to_string(s) + ": " + std::to_string(n);
  std::printf("shard %d: version %lld, applied %lld, rejected stale %lld, invalid %lld, non-finite skipped %lld, "
              "lease waits %lld (%.1f s); staleness {%s}\n",
              shard->shard(), static_cast<long long>(shard->version()), static_cast<long long>(c.applied),
              static_cast<long long>(c.rejected_stale), static_cast<long long>(c.rejected_invalid),
              static_cast<long long>(c.skipped_nonfinite), static_cast<long long>(c.lease_waits), c.lease_wait_s,
              hist.c_str());
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dtrain-ps: one parameter-server shard of an asynchronous dtrain job. Under mpirun it is the first "
               "program of an MPMD line (mpirun -np S dtrain-ps --config JOB : -np N dtrain-worker --config JOB); "
               "alone it serves shard --shard until SIGTERM.",
               "dtrain-ps"};
  std::string config_path, token_file, port_file, bind, run_dir;
  std::vector<std::string> overrides;
  int shard_flag = -1, port = 0;
  bool ignored = false;
  app.add_option("--config", config_path, "job config (protobuf text format)")->required()->check(CLI::ExistingFile);
  app.add_option("--set", overrides, "override a config field (repeatable), as given to the workers");
  app.add_option("--shard", shard_flag, "shard index when not started by mpirun (default 0)");
  app.add_option("--port", port, "port to listen on (default: a free one)");
  app.add_option("--port-file", port_file, "write the port chosen to this file once listening");
  app.add_option("--bind", bind, "address to bind (default: launch.bind_address, 127.0.0.1)");
  app.add_option("--token-file", token_file, "file whose first line is the job token (if DTRAIN_JOB_TOKEN is unset)");
  app.add_option("--run-dir", run_dir, "accepted for a command line shared with dtrain-worker");
  app.add_flag("--no-progress,--resume,--force", ignored, "accepted for a command line shared with dtrain-worker");
  CLI11_PARSE(app, argc, argv);

  const bool mpi = UnderMpirun();
  int shard = std::max(shard_flag, 0), num_shards = 1;
  if (mpi) {
    int provided = 0;
    if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
      std::fprintf(stderr, "dtrain-ps: MPI_Init_thread failed\n");
      return 1;
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    if (dtrain::Status st = dtrain::paramserver::mpmd::ShardJoin(&shard, &num_shards); !st.ok()) return Fail(st, mpi);
  }
  dtrain::LoggingOptions lo;
  lo.role = "ps";
  lo.rank = shard;
  if (const char* dir = dtrain::env::Get(dtrain::env::kLogDir, nullptr)) {
    lo.file = std::string(dir) + "/ps-" + std::to_string(shard) + ".log";
  }
  if (dtrain::Status st = dtrain::InitLogging(lo); !st.ok()) return Fail(st, mpi);
  if (dtrain::Status st = dtrain::coordinator::MembershipClient::FromEnvironment(dtrain::PARAM_SERVER, shard, &g_membership);
      !st.ok()) {
    return Fail(st, mpi);
  }

  if (!run_dir.empty()) overrides.push_back("run_dir=" + run_dir);
  dtrain::JobConfig config;
  if (dtrain::Status st = dtrain::LoadJobConfig(config_path, overrides, &config); !st.ok()) return Fail(st, mpi);
  if (config.parallelism().mode_case() != dtrain::ParallelismConfig::kAsync) {
    return Fail(dtrain::Status::InvalidArgument(config_path + ": dtrain-ps serves jobs with parallelism.async, this "
                                                "one is " + dtrain::ParallelismModeName(config)),
                mpi);
  }
  if (mpi && num_shards != config.parallelism().async().shards()) {
    std::fprintf(stderr, "dtrain-ps: warning: parallelism.async.shards is %d but mpirun started %d shard(s): "
                 "serving with %d\n", config.parallelism().async().shards(), num_shards, num_shards);
  }
  std::string token;
  if (dtrain::Status st = dtrain::rpc::LoadJobToken(token_file, &token); !st.ok()) return Fail(st, mpi);
  dtrain::paramserver::KeepTransferBuffersInTheHeap();
  dtrain::paramserver::PsServerOptions o = dtrain::paramserver::PsServerOptionsFromConfig(config, shard, token);
  if (!bind.empty()) o.bind_address = bind;
  o.port = port;
  std::unique_ptr<dtrain::paramserver::PsServer> server;
  if (dtrain::Status st = dtrain::paramserver::PsServer::Start(o, &server); !st.ok()) return Fail(st, mpi);
  if (!port_file.empty()) {
    if (dtrain::Status st = dtrain::WritePortFile(port_file, server->port()); !st.ok()) return Fail(st, mpi);
  }
  if (mpi) {
    const std::string address = dtrain::paramserver::AdvertisedAddress(o.bind_address, server->port());
    if (dtrain::Status st = dtrain::paramserver::mpmd::ShardPublish(address); !st.ok()) return Fail(st, mpi);
    if (dtrain::Status st = dtrain::paramserver::mpmd::JobDone(100); !st.ok()) return Fail(st, mpi);
  } else {
    std::signal(SIGINT, OnSignal);
    std::signal(SIGTERM, OnSignal);
    while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  LogCounters(*server);
  server->Shutdown();
  if (g_membership) {
    g_membership->Goodbye(dtrain::Status::OK());
    g_membership.reset();
  }
  if (mpi) MPI_Finalize();
  return 0;
}
