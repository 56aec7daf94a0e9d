// dtrain status [RUN_DIR]...: what each run directory holds, with the jobs of
// the coordinator that `dtrain run` embedded (read-only, so it works while
// the job runs); dtrain status --coordinator HOST:PORT: every job of a
// dtrain-coordinator, with its processes.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dtrain/common/checkpoint_store.h"
#include "dtrain/common/config.h"
#include "cli_coordinator.h"
#include "dtrain/coordinator/cli.h"
#include "dtrain/coordinator/coordinator.h"
#include "dtrain/coordinator/job_table.h"
#include "dtrain/indexer/index_builder.h"

namespace dtrain::cli {
namespace {
namespace fs = std::filesystem;

struct StatusArgs {
  std::vector<std::string> run_dirs;
  std::string runs_root = "runs";
  CoordinatorArgs coordinator;
  std::string job;
};

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The jobs `dtrain run` ran in this directory, newest last, with processes.
void ShowRunJobs(const std::string& dir) {
  std::unique_ptr<coordinator::JobTable> table;
  if (!coordinator::JobTable::OpenReadOnly(dir + "/coordinator/db", &table).ok()) return;
  std::vector<JobRecord> jobs;
  if (Status st = table->List(&jobs); !st.ok()) {
    std::printf("  jobs         unreadable: %s\n", st.ToString().c_str());
    return;
  }
  if (jobs.empty()) return;
  // The newest with its processes; the count of the others.
  std::string text = coordinator::JobsTable({jobs.back()}, /*processes=*/true, NowMs());
  std::printf("  jobs         %zu run here; the latest:\n", jobs.size());
  size_t start = 0, nl;
  while ((nl = text.find('\n', start)) != std::string::npos) {
    std::printf("    %s\n", text.substr(start, nl - start).c_str());
    start = nl + 1;
  }
}

Status ShowCoordinator(const StatusArgs& a) {
  std::unique_ptr<coordinator::CoordinatorClient> client;
  DTRAIN_RETURN_IF_ERROR(ConnectCoordinator(a.coordinator, &client));
  std::vector<JobRecord> jobs;
  DTRAIN_RETURN_IF_ERROR(client->Jobs(a.job, &jobs));
  if (jobs.empty()) {
    std::printf("the coordinator at %s has no jobs\n", a.coordinator.address.c_str());
    return Status::OK();
  }
  std::printf("%s", coordinator::JobsTable(jobs, /*processes=*/true, NowMs()).c_str());
  return Status::OK();
}

void ShowRun(const std::string& dir) {
  JobConfig config;
  Status st = LoadJobConfig((fs::path(dir) / "config.textproto").string(), {}, &config);
  if (!st.ok()) {
    std::printf("%s\n  not a readable run directory: %s\n", dir.c_str(), st.ToString().c_str());
    return;
  }
  const char* mode = config.parallelism().has_async() ? "async" : config.parallelism().has_pipeline() ? "pipeline" : "sync";
  std::printf("%s  job %s  (%s, %d worker(s), %d epoch(s))\n", dir.c_str(), config.name().c_str(), mode,
              config.launch().workers(), config.training().epochs());
  // Checkpoints (read-only: works while the job writes).
  StoreOptions so;
  so.path = config.checkpoint().dir();
  so.read_only = true;
  so.create_if_missing = false;
  std::unique_ptr<CheckpointStore> store;
  if (fs::exists(so.path) && CheckpointStore::Open(so, &store).ok()) {
    std::vector<CheckpointInfo> infos;
    if (store->List(&infos).ok() && !infos.empty()) {
      const CheckpointInfo& latest = infos.front();
      std::printf("  checkpoints  %zu, latest step %lld (epoch %lld, %s mode, world size %d)\n", infos.size(),
                  static_cast<long long>(latest.step), static_cast<long long>(latest.epoch), latest.mode.c_str(),
                  latest.world_size);
    } else {
      std::printf("  checkpoints  none\n");
    }
  } else {
    std::printf("  checkpoints  no store\n");
  }
  ShowRunJobs(dir);
  std::printf("  model        %s\n", fs::exists(fs::path(dir) / "model.pt") ? "model.pt (training finished)" : "none yet");
  std::ifstream eval(fs::path(dir) / "eval.json");
  if (eval) {
    try {
      nlohmann::json j = nlohmann::json::parse(eval);
      if (j.value("task", "") == "detection") {
        std::printf("  evaluation   AP50 %.4f  COCO AP %.4f  on %lld snaps\n", j["model"]["mean_ap50"].get<double>(),
                    j["model"]["mean_ap"].get<double>(), static_cast<long long>(j["model"]["images"].get<int64_t>()));
      } else {
        std::printf("  evaluation   Precision@1 %.4f  MAP@R %.4f  (raw pixels %.4f / %.4f)\n",
                    j["model"]["precision_at_1"].get<double>(), j["model"]["map_at_r"].get<double>(),
                    j["raw_pixels"]["precision_at_1"].get<double>(), j["raw_pixels"]["map_at_r"].get<double>());
      }
    } catch (const std::exception& e) {
      std::printf("  evaluation   eval.json unreadable: %s\n", e.what());
    }
  }
  const std::string index_dir = config.index().output_dir().empty() ? dir + "/index" : config.index().output_dir();
  IndexManifest m;
  if (indexer::ReadIndexManifest(index_dir, &m).ok()) {
    std::printf("  index        %s: %s\n", index_dir.c_str(), indexer::DescribeManifest(m).c_str());
  } else {
    std::printf("  index        none%s\n", config.index().build_at_end() ? "" : " (index.build_at_end is off)");
  }
}

Status Show(const StatusArgs& a) {
  if (!a.coordinator.address.empty()) return ShowCoordinator(a);
  std::vector<std::string> dirs = a.run_dirs;
  if (dirs.empty()) {
    std::error_code ec;
    if (!fs::is_directory(a.runs_root, ec)) {
      std::printf("no runs: %s does not exist (dtrain run writes runs/<job name>/)\n", a.runs_root.c_str());
      return Status::OK();
    }
    for (const auto& e : fs::directory_iterator(a.runs_root, ec)) {
      if (fs::exists(e.path() / "config.textproto")) dirs.push_back(e.path().string());
    }
    std::sort(dirs.begin(), dirs.end());
    if (dirs.empty()) std::printf("no runs under %s\n", a.runs_root.c_str());
  }
  for (const std::string& d : dirs) {
    if (!fs::is_directory(d)) return Status::NotFound(d + " is not a directory");
    ShowRun(d);
  }
  return Status::OK();
}

}  // namespace

void AddStatusCommand(CLI::App& app, int* exit_code) {
  auto a = std::make_shared<StatusArgs>();
  CLI::App* cmd = app.add_subcommand(
      "status", "show runs (jobs and processes, checkpoints, evaluation, index), or a dtrain-coordinator's jobs");
  cmd->add_option("RUN_DIR", a->run_dirs, "run directories (default: every run under runs/)");
  cmd->add_option("--runs", a->runs_root, "where to look for runs")->capture_default_str();
  cmd->add_option("--job", a->job, "with --coordinator: only this job");
  AddCoordinatorOptions(cmd, &a->coordinator, false);
  cmd->callback([a, exit_code] {
    Status st = Show(*a);
    if (!st.ok()) {
      std::fprintf(stderr, "dtrain status: %s\n", st.ToString().c_str());
      *exit_code = 1;
    }
  });
}

}  // namespace dtrain::cli
