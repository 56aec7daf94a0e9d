#include "dtrain/worker/run_job.h"

#include <spdlog/spdlog.h>

#include <cstdio>

#include "dtrain/common/config.h"

namespace dtrain::worker {

Status RunJob(const JobConfig& config, const TrainerOptions& options, TrainResult* result) {
  if (config.parallelism().mode_case() != ParallelismConfig::kSync) {
    return Status::FailedPrecondition(std::string("parallelism.") + ParallelismModeName(config) +
                                      ": this build trains with one local worker only; the " +
                                      ParallelismModeName(config) +
                                      " strategy is not built yet (docs/status.md). Use --set 'parallelism.sync={}'");
  }
  if (config.launch().workers() != 1) {
    return Status::FailedPrecondition("launch.workers: " + std::to_string(config.launch().workers()) +
                                      " workers need the sync all-reduce strategy, which is not built yet "
                                      "(docs/status.md); use --set launch.workers=1");
  }
  std::unique_ptr<Trainer> trainer;
  DTRAIN_RETURN_IF_ERROR(Trainer::Create(config, std::make_unique<LocalStrategy>(), options, &trainer));
  TrainResult r;
  DTRAIN_RETURN_IF_ERROR(trainer->Run(&r));
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

}  // namespace dtrain::worker
