#include "dtrain/worker/run_job.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "dtrain/common/config.h"
#include "dtrain/common/env.h"
#include "dtrain/common/rpc.h"
#include "dtrain/paramserver/mpmd.h"
#include "dtrain/paramserver/service.h"
#include "dtrain/worker/async_strategy.h"
#include "dtrain/worker/detector_trainer.h"
#include "dtrain/worker/pipeline_strategy.h"
#include "dtrain/worker/collective/mpi_collective.h"
#include "dtrain/worker/sync_strategy.h"

namespace dtrain::worker {
namespace {

// Threads per rank when training.threads is 0: the cores over the ranks on
// this node.
void DefaultThreads(JobConfig* config) {
  if (config->training().threads() != 0) return;
  const int local = std::max(1, std::atoi(env::Get(env::kOmpiLocalSize, "1")));
  const int cores = std::max(1u, std::thread::hardware_concurrency());
  config->mutable_training()->set_threads(std::max(1, cores / local));
}

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
  DefaultThreads(config);
  collective::MpiCollectiveOptions co;
  co.timeout = std::chrono::milliseconds(static_cast<int64_t>(static_cast<double>(sc.collective_timeout_s()) * 1e3));
  std::unique_ptr<collective::MpiCollective> coll;
  DTRAIN_RETURN_IF_ERROR(collective::MpiCollective::Create(co, &coll));
  *out = std::make_unique<SyncStrategy>(std::move(coll), SyncOptionsFromConfig(*config));
  return Status::OK();
}

// The pipeline strategy over every rank of MPI_COMM_WORLD: stages x replicas.
Status MakePipelineStrategy(JobConfig* config, std::unique_ptr<Strategy>* out) {
  DTRAIN_RETURN_IF_ERROR(CheckPipelineConfig(*config));
  const PipelineConfig& pc = config->parallelism().pipeline();
  if (!collective::MpiRuntime::LaunchedByMpirun()) {
    return Status::FailedPrecondition("parallelism.pipeline runs its " + std::to_string(pc.stages()) +
                                      " stages as MPI ranks: start it with `dtrain run` or mpirun -np " +
                                      std::to_string(pc.stages()) + " dtrain-worker ...");
  }
  DTRAIN_RETURN_IF_ERROR(collective::MpiRuntime::Init());
  const int world = collective::MpiRuntime::world_size();
  if (world % pc.stages() != 0) {
    return Status::FailedPrecondition("mpirun started " + std::to_string(world) +
                                      " rank(s), not a multiple of parallelism.pipeline.stages " +
                                      std::to_string(pc.stages()) + " (launch.workers = stages x replicas)");
  }
  config->mutable_launch()->set_workers(world);
  DefaultThreads(config);
  collective::MpiCollectiveOptions co;
  co.timeout = std::chrono::milliseconds(static_cast<int64_t>(static_cast<double>(pc.timeout_s()) * 1e3));
  PipelineStrategyOptions o;
  o.config = pc;
  o.batch = config->data().batch_size();
  std::unique_ptr<collective::MpiCollective> w;
  DTRAIN_RETURN_IF_ERROR(collective::MpiCollective::Create(co, &w));
  const int stage = w->rank() % pc.stages();
  o.world = std::move(w);
  if (world > pc.stages()) {
    std::unique_ptr<collective::MpiCollective> group;
    DTRAIN_RETURN_IF_ERROR(collective::MpiCollective::CreateSplit(co, stage, &group));
    o.stage_group = std::move(group);
  }
  *out = std::make_unique<PipelineStrategy>(std::move(o));
  return Status::OK();
}

// The async strategy: under mpirun, the worker ranks of an MPMD world whose
// shard ranks publish their addresses (paramserver/mpmd.h); alone, one
// worker talking to the shards listed in DTRAIN_PS_ADDRESSES.
Status MakeAsyncStrategy(JobConfig* config, bool* mpmd, std::unique_ptr<Strategy>* out) {
  AsyncStrategyOptions o;
  o.config = config->parallelism().async();
  *mpmd = collective::MpiRuntime::LaunchedByMpirun();
  if (*mpmd) {
    DTRAIN_RETURN_IF_ERROR(collective::MpiRuntime::Init());
    collective::MpiCollectiveOptions co;
    co.timeout = std::chrono::milliseconds(static_cast<int64_t>(1e3 * o.config.rpc_timeout_s()));
    std::unique_ptr<collective::MpiCollective> coll;
    DTRAIN_RETURN_IF_ERROR(collective::MpiCollective::CreateSplit(co, paramserver::mpmd::kWorkerColor, &coll));
    DTRAIN_RETURN_IF_ERROR(paramserver::mpmd::WorkerReceive(&o.addresses));
    if (coll->size() != config->launch().workers() && coll->rank() == 0) {
      spdlog::warn("launch.workers is {} but mpirun started {} worker(s): training with {}",
                   config->launch().workers(), coll->size(), coll->size());
    }
    config->mutable_launch()->set_workers(coll->size());
    o.workers = std::move(coll);
  } else {
    const char* list = env::Get(env::kPsAddresses, nullptr);
    if (list == nullptr || *list == '\0') {
      return Status::FailedPrecondition(
          "parallelism.async needs parameter-server shards: start the job with `dtrain run` (it launches them), "
          "or mpirun -np S dtrain-ps --config JOB : -np N dtrain-worker --config JOB, or give one worker the "
          "addresses of running dtrain-ps processes in " + std::string(env::kPsAddresses) + " (HOST:PORT,...)");
    }
    std::string rest = list;
    while (!rest.empty()) {
      const size_t comma = rest.find(',');
      const std::string a = rest.substr(0, comma);
      if (!a.empty()) o.addresses.push_back(a);
      rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
    }
    config->mutable_launch()->set_workers(1);
  }
  DTRAIN_RETURN_IF_ERROR(rpc::LoadJobToken("", &o.token));
  paramserver::KeepTransferBuffersInTheHeap();
  DefaultThreads(config);
  o.stats_path = config->run_dir() + "/paramserver.json";
  *out = std::make_unique<AsyncStrategy>(std::move(o));
  return Status::OK();
}

}  // namespace

Status RunJob(const JobConfig& job, const TrainerOptions& options, TrainResult* result) {
  JobConfig config = job;
  std::unique_ptr<Strategy> strategy;
  bool mpmd = false;
  if (config.parallelism().mode_case() == ParallelismConfig::kPipeline) {
    DTRAIN_RETURN_IF_ERROR(MakePipelineStrategy(&config, &strategy));
  } else if (config.parallelism().mode_case() == ParallelismConfig::kAsync) {
    DTRAIN_RETURN_IF_ERROR(MakeAsyncStrategy(&config, &mpmd, &strategy));
  } else if (collective::MpiRuntime::LaunchedByMpirun()) {
    DTRAIN_RETURN_IF_ERROR(MakeSyncStrategy(&config, &strategy));
  } else {
    if (config.launch().workers() > 1) {
      spdlog::warn("launch.workers is {} but this process was not started by mpirun: training with 1 worker "
                   "(use `dtrain run`, or mpirun -np {} dtrain-worker ...)",
                   config.launch().workers(), config.launch().workers());
    }
    strategy = std::make_unique<LocalStrategy>();
  }
  if (models::IsDetectorModel(config.model().name())) {
    DetectorTrainResult dr;
    DTRAIN_RETURN_IF_ERROR(TrainDetector(config, std::move(strategy), options, &dr));
    if (dr.evaluated) {
      std::printf("\nDetection on %lld evaluation snaps:\n%s", static_cast<long long>(dr.metrics.images),
                  DetectionTable(dr.metrics).c_str());
      if (options.write_outputs) std::printf("written to %s/eval.json\n", config.run_dir().c_str());
      std::fflush(stdout);
    }
    if (result) {
      *result = TrainResult{};
      result->steps = dr.steps;
      result->resumed_from_step = dr.resumed_from_step;
      result->train_seconds = dr.train_seconds;
      result->images_per_sec = dr.images_per_sec;
      result->final_loss = dr.final_loss;
    }
    return Status::OK();
  }
  TrainResult r;
  {
    std::unique_ptr<Trainer> trainer;
    DTRAIN_RETURN_IF_ERROR(Trainer::Create(config, std::move(strategy), options, &trainer));
    DTRAIN_RETURN_IF_ERROR(trainer->Run(&r));
  }
  // The shards of an MPMD job exit once every worker is here.
  if (mpmd) DTRAIN_RETURN_IF_ERROR(paramserver::mpmd::JobDone(50));
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
