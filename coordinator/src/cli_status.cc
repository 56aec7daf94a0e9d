// dtrain status [RUN_DIR]...: what each run directory holds. (The coordinator
// service will add live jobs and processes; this reads the directories.)
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dtrain/common/checkpoint_store.h"
#include "dtrain/common/config.h"
#include "dtrain/coordinator/cli.h"
#include "dtrain/indexer/index_builder.h"

namespace dtrain::cli {
namespace {
namespace fs = std::filesystem;

struct StatusArgs {
  std::vector<std::string> run_dirs;
  std::string runs_root = "runs";
};

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
  std::printf("  model        %s\n", fs::exists(fs::path(dir) / "model.pt") ? "model.pt (training finished)" : "none yet");
  std::ifstream eval(fs::path(dir) / "eval.json");
  if (eval) {
    try {
      nlohmann::json j = nlohmann::json::parse(eval);
      std::printf("  evaluation   Precision@1 %.4f  MAP@R %.4f  (raw pixels %.4f / %.4f)\n",
                  j["model"]["precision_at_1"].get<double>(), j["model"]["map_at_r"].get<double>(),
                  j["raw_pixels"]["precision_at_1"].get<double>(), j["raw_pixels"]["map_at_r"].get<double>());
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
  CLI::App* cmd = app.add_subcommand("status", "show runs: checkpoints, evaluation, index");
  cmd->add_option("RUN_DIR", a->run_dirs, "run directories (default: every run under runs/)");
  cmd->add_option("--runs", a->runs_root, "where to look for runs")->capture_default_str();
  cmd->callback([a, exit_code] {
    Status st = Show(*a);
    if (!st.ok()) {
      std::fprintf(stderr, "dtrain status: %s\n", st.ToString().c_str());
      *exit_code = 1;
    }
  });
}

}  // namespace dtrain::cli
