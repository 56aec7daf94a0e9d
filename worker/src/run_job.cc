#include "dtrain/worker/run_job.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "dtrain/common/config.h"
#include "dtrain/common/env.h"
#include "dtrain/worker/collective/mpi_collective.h"
#include "dtrain/worker/sync_strategy.h"

namespace dtrain::worker {
namespace {

// The sync strategy over every rank of MPI_COMM_WORLD.
Status MakeSyncStrategy(JobConfig* config, std::unique_ptr<Strategy>* out) {
  const SyncConfig& sc = config->parallelism().sync();
  if (sc.backend() == SyncConfig::BACKEND_NCCL) {
    return Status::FailedPrecondition(
        "parallelism.sync.backend: BACKEND_NCCL all-reduces CUDA tensors, but the trainer computes on the CPU in "
        "this build (GPU placement is not built yet, docs/status.md); use BACKEND_AUTO or BACKEND_MPI");
  }
  DTRAIN_RETURN_IF_ERROR(collective::MpiRuntime::Init());
  const int world = collective::MpiRuntime::world_size();
  if (world != config->launch().workers() && collective::MpiRuntime::world_rank() == 0) {
    spdlog::warn("launch.workers is {} but mpirun started {} rank(s): training with {}", config->launch().workers(),
                 world, world);
  }
  config->mutable_launch()->set_workers(world);
  if (config->training().threads() == 0) {
    const int local = std::max(1, std::atoi(env::Get(env::kOmpiLocalSize, "1")));
    const int cores = std::max(1u, std::thread::hardware_concurrency());
    config->mutable_training()->set_threads(std::max(1, cores / local));
  }
  collective::MpiCollectiveOptions co;
  co.timeout = std::chrono::milliseconds(static_cast<int64_t>(static_cast<double>(sc.collective_timeout_s()) * 1e3));
  std::unique_ptr<collective::MpiCollective> coll;
  DTRAIN_RETURN_IF_ERROR(collective::MpiCollective::Create(co, &coll));
  *out = std::make_unique<SyncStrategy>(std::move(coll), SyncOptionsFromConfig(*config));
  return Status::OK();
}

}  // namespace

Status RunJob(const JobConfig& job, const TrainerOptions& options, TrainResult* result) {
  JobConfig config = job;
  if (config.parallelism().mode_case() != ParallelismConfig::kSync) {
    return Status::FailedPrecondition(std::string("parallelism.") + ParallelismModeName(config) +
                                      ": the " + ParallelismModeName(config) +
                                      " strategy is not built yet (docs/status.md); use --set 'parallelism.sync={}'");
  }
  std::unique_ptr<Strategy> strategy;
  if (collective::MpiRuntime::LaunchedByMpirun()) {
    DTRAIN_RETURN_IF_ERROR(MakeSyncStrategy(&config, &strategy));
  } else {
    if (config.launch().workers() > 1) {
      spdlog::warn("launch.workers is {} but this process was not started by mpirun: training with 1 worker "
                   "(use `dtrain run`, or mpirun -np {} dtrain-worker ...)",
                   config.launch().workers(), config.launch().workers());
    }
    strategy = std::make_unique<LocalStrategy>();
  }
  TrainResult r;
  {
    std::unique_ptr<Trainer> trainer;
    DTRAIN_RETURN_IF_ERROR(Trainer::Create(config, std::move(strategy), options, &trainer));
    DTRAIN_RETURN_IF_ERROR(trainer->Run(&r));
  }
  if (r.evaluated) {
    std::printf("\nRetrieval on the Fashion-MNIST test set (%lld queries, leave-one-out):\n%s",
                static_cast<long long>(r.model_metrics.queries),
                EvalTable(r.model_metrics, r.raw_pixel_metrics).c_str());
    if (options.write_outputs) std::printf("written to %s/eval.json\n", config.run_dir().c_str());
    std::fflush(stdout);
  }
  if (result) *result = r;
  return Status::OK();
}

int FinishProcess(const char* program, const Status& st) {
  if (st.ok()) {
    collective::MpiRuntime::Finalize();
    return 0;
  }
  std::fprintf(stderr, "%s: %s\n", program, st.ToString().c_str());
  std::fflush(stderr);
  if (collective::MpiRuntime::initialized() && collective::MpiRuntime::world_size() > 1) {
    std::fprintf(stderr, "%s: rank %d failed; ending every rank of the job\n", program,
                 collective::MpiRuntime::world_rank());
    collective::MpiRuntime::Abort(1);
  }
  collective::MpiRuntime::Finalize();
  return 1;
}

}  // namespace dtrain::worker
