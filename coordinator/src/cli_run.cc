// dtrain run / dtrain eval.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/common/config.h"
#include "dtrain/common/env.h"
#include "dtrain/common/rpc.h"
#include "dtrain/common/metrics_log.h"
#include "dtrain/coordinator/cli.h"
#include "dtrain/coordinator/index_handoff.h"
#include "dtrain/coordinator/mpirun_launcher.h"
#include "dtrain/models/registry.h"
#include "dtrain/worker/run_job.h"
#include "dtrain/worker/trainer.h"

namespace dtrain::cli {
namespace {

struct RunArgs {
  std::string config;
  std::vector<std::string> overrides;
  std::string run_dir;
  bool no_progress = false;
  bool resume = false;
  bool force = false;
};

struct EvalArgs {
  std::string run_dir;
  std::string model;
  std::vector<std::string> overrides;
};

// The completion step (coordinator/index_handoff.h): the finished model goes
// to the index builder when index.build_at_end is set.
Status HandOff(const JobConfig& config, const RunArgs& a) {
  if (!config.index().build_at_end()) return Status::OK();
  std::unique_ptr<indexer::IndexBuilder> builder;
  DTRAIN_RETURN_IF_ERROR(coordinator::MakeIndexBuilder(config, !a.no_progress, &builder));
  IndexManifest manifest;
  DTRAIN_RETURN_IF_ERROR(coordinator::HandOffToIndexer(config, *builder, &manifest));
  std::printf("index: %s\n", indexer::DescribeManifest(manifest).c_str());
  return Status::OK();
}

Status Run(const RunArgs& a) {
  std::vector<std::string> overrides = a.overrides;
  if (!a.run_dir.empty()) overrides.push_back("run_dir=" + a.run_dir);
  JobConfig config;
  DTRAIN_RETURN_IF_ERROR(LoadJobConfig(a.config, overrides, &config));
  const bool async = config.parallelism().mode_case() == ParallelismConfig::kAsync;
  if (config.launch().workers() > 1 || config.launch().launcher() == LaunchConfig::MPIRUN || async) {
    // Several workers: one dtrain-worker per rank under mpirun; async jobs
    // start their dtrain-ps shards in the same mpirun (MPMD).
    if (async && env::Get(env::kJobToken, nullptr) == nullptr) {
      // Every RPC to the shards carries it; mpirun.sh passes DTRAIN_* on.
      setenv(env::kJobToken, rpc::NewJobToken().c_str(), 1);
    }
    coordinator::MpirunRequest req;
    req.config_path = a.config;
    req.overrides = overrides;
    req.no_progress = a.no_progress;
    req.resume = a.resume;
    req.force = a.force;
    std::vector<std::string> argv;
    DTRAIN_RETURN_IF_ERROR(coordinator::BuildMpirunCommand(config, req, &argv));
    DTRAIN_RETURN_IF_ERROR(coordinator::RunAndWait(argv));
    return HandOff(config, a);
  }
  worker::TrainerOptions options;
  options.progress = !a.no_progress;
  options.resume = a.resume;
  options.force_store = a.force;
  DTRAIN_RETURN_IF_ERROR(worker::RunJob(config, options, nullptr));
  return HandOff(config, a);
}

// dtrain resume RUN_DIR: the run's resolved config (plus overrides, e.g. a
// longer schedule or another mode), continued from its newest good checkpoint.
Status Resume(const RunArgs& a) {
  const std::string config_path = a.run_dir + "/config.textproto";
  if (!std::filesystem::exists(config_path)) {
    return Status::NotFound(a.run_dir + " is not a run directory: it has no config.textproto");
  }
  RunArgs r = a;
  r.config = config_path;
  r.resume = true;
  return Run(r);
}

Status Eval(const EvalArgs& a) {
  const std::string config_path = a.run_dir + "/config.textproto";
  if (!std::filesystem::exists(config_path)) {
    return Status::NotFound(a.run_dir + " is not a run directory: it has no config.textproto");
  }
  JobConfig config;
  DTRAIN_RETURN_IF_ERROR(LoadJobConfig(config_path, a.overrides, &config));
  models::Embedder model{nullptr};
  DTRAIN_RETURN_IF_ERROR(models::BuildEmbedder(config.model(), &model));
  const std::string model_path = a.model.empty() ? a.run_dir + "/model.pt" : a.model;
  DTRAIN_RETURN_IF_ERROR(worker::LoadModel(model_path, *model));
  RetrievalMetrics mm, raw;
  DTRAIN_RETURN_IF_ERROR(worker::EvaluateOnTestSplit(config, *model, &mm, &raw));
  std::printf("Retrieval on the Fashion-MNIST test set (%lld queries, leave-one-out), model %s:\n%s",
              static_cast<long long>(mm.queries), model_path.c_str(), worker::EvalTable(mm, raw).c_str());
  DTRAIN_RETURN_IF_ERROR(WriteFileAtomically(a.run_dir + "/eval.json", worker::EvalJson(config, mm, raw, nullptr)));
  std::printf("written to %s/eval.json\n", a.run_dir.c_str());
  return Status::OK();
}

}  // namespace

void AddRunCommands(CLI::App& app, int* exit_code) {
  auto run_args = std::make_shared<RunArgs>();
  CLI::App* run = app.add_subcommand("run", "train a job from its config, evaluate it, write the run directory");
  run->add_option("CONFIG", run_args->config, "job config (configs/*.textproto)")->required()->check(CLI::ExistingFile);
  run->add_option("--set", run_args->overrides, "override a config field: --set optimizer.lr=0.05 (repeatable)");
  run->add_option("--run-dir", run_args->run_dir, "run directory (default: runs/<job name>)");
  run->add_flag("--no-progress", run_args->no_progress, "no progress bar, only log lines");
  run->add_flag("--resume", run_args->resume, "continue from the newest good checkpoint of the run's store, if any");
  run->add_flag("--force", run_args->force, "use a checkpoint store that another job or model config created");
  run->callback([run_args, exit_code] {
    Status st = Run(*run_args);
    if (!st.ok()) {
      std::fprintf(stderr, "dtrain run: %s\n", st.ToString().c_str());
      *exit_code = 1;
    }
  });

  auto resume_args = std::make_shared<RunArgs>();
  CLI::App* resume = app.add_subcommand(
      "resume", "continue a run from its newest good checkpoint (a corrupt one is skipped, with a warning)");
  resume->add_option("RUN_DIR", resume_args->run_dir, "run directory (holds config.textproto and store/)")->required();
  resume->add_option("--set", resume_args->overrides,
                     "override a config field, e.g. --set training.epochs=10 (model and loss must stay the same)");
  resume->add_flag("--no-progress", resume_args->no_progress, "no progress bar, only log lines");
  resume->add_flag("--force", resume_args->force, "use a checkpoint store that another job or model config created");
  resume->callback([resume_args, exit_code] {
    Status st = Resume(*resume_args);
    if (!st.ok()) {
      std::fprintf(stderr, "dtrain resume: %s\n", st.ToString().c_str());
      *exit_code = 1;
    }
  });

  auto eval_args = std::make_shared<EvalArgs>();
  CLI::App* eval = app.add_subcommand(
      "eval", "evaluate a run's model on the Fashion-MNIST test set (Precision@1, R-Precision, MAP@R, Recall@K) "
              "beside the raw-pixel baseline; writes RUN_DIR/eval.json");
  eval->add_option("RUN_DIR", eval_args->run_dir, "run directory of a trained job")->required();
  eval->add_option("--model", eval_args->model, "model file (default: RUN_DIR/model.pt)");
  eval->add_option("--set", eval_args->overrides, "override a config field, e.g. --set data.test_limit=1000");
  eval->callback([eval_args, exit_code] {
    Status st = Eval(*eval_args);
    if (!st.ok()) {
      std::fprintf(stderr, "dtrain eval: %s\n", st.ToString().c_str());
      *exit_code = 1;
    }
  });
}

}  // namespace dtrain::cli
