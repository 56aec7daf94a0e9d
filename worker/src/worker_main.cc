// dtrain-worker: one training process. Started by the coordinator (dtrain run)
// or directly: dtrain-worker --config job.textproto [--set k=v]...
#include <CLI/CLI.hpp>
#include <cstdio>

#include "dtrain/common/config.h"
#include "dtrain/common/logging.h"
#include "dtrain/worker/run_job.h"

int main(int argc, char** argv) {
  CLI::App app{"dtrain-worker: one training process of a dtrain job", "dtrain-worker"};
  std::string config_path, run_dir;
  std::vector<std::string> overrides;
  bool no_progress = false;
  app.add_option("--config", config_path, "job config (protobuf text format)")->required()->check(CLI::ExistingFile);
  app.add_option("--set", overrides, "override a config field: --set optimizer.lr=0.05 (repeatable)");
  app.add_option("--run-dir", run_dir, "run directory (default: the config's run_dir, runs/<name>)");
  app.add_flag("--no-progress", no_progress, "no progress bar, only log lines");
  CLI11_PARSE(app, argc, argv);

  dtrain::LoggingOptions lo;
  lo.role = "worker";
  if (dtrain::Status st = dtrain::InitLogging(lo); !st.ok()) {
    std::fprintf(stderr, "dtrain-worker: %s\n", st.ToString().c_str());
    return 2;
  }
  if (!run_dir.empty()) overrides.push_back("run_dir=" + run_dir);
  dtrain::JobConfig config;
  dtrain::Status st = dtrain::LoadJobConfig(config_path, overrides, &config);
  if (st.ok()) {
    dtrain::worker::TrainerOptions options;
    options.progress = !no_progress;
    st = dtrain::worker::RunJob(config, options, nullptr);
  }
  if (!st.ok()) {
    std::fprintf(stderr, "dtrain-worker: %s\n", st.ToString().c_str());
    return 1;
  }
  return 0;
}
