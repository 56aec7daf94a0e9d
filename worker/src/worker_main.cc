// dtrain-worker: one training process. Started by `dtrain run` (through
// launch/mpirun.sh when the job has several workers), by mpirun directly:
//   mpirun -np 2 dtrain-worker --config job.textproto [--set k=v]...
// or alone (one local worker). Started by a coordinator (DTRAIN_COORDINATOR
// set), it registers, heartbeats with its progress and says goodbye
// (coordinator/membership.h).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <sstream>

#include "dtrain/common/config.h"
#include "dtrain/common/env.h"
#include "dtrain/common/logging.h"
#include "dtrain/coordinator/membership.h"
#include "dtrain/worker/collective/mpi_collective.h"
#include "dtrain/worker/run_job.h"

namespace {

// This worker's rank for the log tag: its world rank, less the ranks of the
// programs before it on an MPMD line (an async job's dtrain-ps shards).
int WorkerRank() {
  int rank = std::atoi(dtrain::env::Get(dtrain::env::kOmpiWorldRank, "0"));
  const int app = std::atoi(dtrain::env::Get(dtrain::env::kOmpiAppNum, "0"));
  std::istringstream procs(dtrain::env::Get(dtrain::env::kOmpiAppProcs, ""));
  for (int i = 0, n = 0; i < app && procs >> n; ++i) rank -= n;
  return rank;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dtrain-worker: one training process of a dtrain job. Under mpirun (or another MPI launcher) "
               "the ranks train together with synchronous all-reduce; alone it trains as one local worker.",
               "dtrain-worker"};
  std::string config_path, run_dir;
  std::vector<std::string> overrides;
  bool no_progress = false, resume = false, force = false;
  app.add_option("--config", config_path, "job config (protobuf text format)")->required()->check(CLI::ExistingFile);
  app.add_option("--set", overrides, "override a config field: --set optimizer.lr=0.05 (repeatable)");
  app.add_option("--run-dir", run_dir, "run directory (default: the config's run_dir, runs/<name>)");
  app.add_flag("--no-progress", no_progress, "no progress bar, only log lines");
  app.add_flag("--resume", resume, "continue from the newest good checkpoint of the job's store, if any");
  app.add_flag("--force", force, "use a checkpoint store that another job or model config created");
  CLI11_PARSE(app, argc, argv);

  const bool mpi = dtrain::collective::MpiRuntime::LaunchedByMpirun();
  const int rank = mpi ? WorkerRank() : 0;
  dtrain::LoggingOptions lo;
  lo.role = "worker";
  if (mpi) lo.rank = rank;
  // Under a coordinator's mpirun: one log file per rank in <run dir>/logs.
  if (const char* dir = dtrain::env::Get(dtrain::env::kLogDir, nullptr)) {
    lo.file = std::string(dir) + "/worker-" + std::to_string(rank) + ".log";
  }
  if (dtrain::Status st = dtrain::InitLogging(lo); !st.ok()) {
    std::fprintf(stderr, "dtrain-worker: %s\n", st.ToString().c_str());
    return 2;
  }
  std::unique_ptr<dtrain::coordinator::MembershipClient> membership;
  dtrain::Status st = dtrain::coordinator::MembershipClient::FromEnvironment(dtrain::WORKER, rank, &membership);
  if (!run_dir.empty()) overrides.push_back("run_dir=" + run_dir);
  dtrain::JobConfig config;
  if (st.ok()) st = dtrain::LoadJobConfig(config_path, overrides, &config);
  if (st.ok()) {
    dtrain::worker::TrainerOptions options;
    options.progress = !no_progress;
    options.resume = resume;
    options.force_store = force;
    if (membership) {
      options.on_progress = [&membership](const dtrain::worker::TrainProgress& p) {
        dtrain::Progress pr;
        pr.set_step(p.step);
        pr.set_total_steps(p.total_steps);
        pr.set_epoch(p.epoch);
        pr.set_loss(p.loss);
        pr.set_images_per_sec(p.images_per_sec);
        pr.set_phase(p.phase);
        membership->SetProgress(pr);
      };
    }
    st = dtrain::worker::RunJob(config, options, nullptr);
  }
  if (membership) membership->Goodbye(st);
  return dtrain::worker::FinishProcess("dtrain-worker", st);
}
