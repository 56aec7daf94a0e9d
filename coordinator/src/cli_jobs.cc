// dtrain submit | stop | logs: a user's side of dtrain-coordinator.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cli_coordinator.h"
#include "dtrain/common/config.h"
#include "dtrain/common/rpc.h"
#include "dtrain/coordinator/cli.h"
#include "dtrain/coordinator/job_table.h"

namespace dtrain::cli {
namespace fs = std::filesystem;

void AddCoordinatorOptions(CLI::App* cmd, CoordinatorArgs* args, bool required) {
  CLI::Option* o = cmd->add_option("--coordinator", args->address,
                                   "the dtrain-coordinator, HOST:PORT (default: $DTRAIN_COORDINATOR)")
                       ->envname("DTRAIN_COORDINATOR");
  if (required) o->required();
  cmd->add_option("--token-file", args->token_file,
                  "file whose first line is the coordinator's token (dtrain-coordinator writes STATE_DIR/token); "
                  "default: $DTRAIN_JOB_TOKEN");
}

Status ConnectCoordinator(const CoordinatorArgs& args, std::unique_ptr<coordinator::CoordinatorClient>* client) {
  std::string token;
  DTRAIN_RETURN_IF_ERROR(rpc::LoadJobToken(args.token_file, &token).WithContext("the coordinator's token"));
  *client = coordinator::CoordinatorClient::Create(args.address, token);
  return Status::OK();
}

Status MakeSubmitRequest(const std::string& path, const std::vector<std::string>& overrides, bool resume, bool force,
                         SubmitRequest* request) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::NotFound("cannot read the config " + path);
  request->set_config_text(std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()));
  for (const std::string& o : overrides) request->add_overrides(o);
  request->set_origin(path);
  request->set_resume(resume);
  request->set_force(force);
  return Status::OK();
}

namespace {

struct SubmitArgs {
  CoordinatorArgs coordinator;
  std::string config;
  std::vector<std::string> overrides;
  std::string run_dir;
  bool resume = false;
  bool force = false;
};

struct JobArgs {
  CoordinatorArgs coordinator;
  std::string job;
  std::string process;
  bool follow = false;
};

Status Submit(const SubmitArgs& a) {
  std::vector<std::string> overrides = a.overrides;
  if (!a.run_dir.empty()) overrides.push_back("run_dir=" + a.run_dir);
  // Checked here first, so that errors name the user's file and line.
  JobConfig config;
  DTRAIN_RETURN_IF_ERROR(LoadJobConfig(a.config, overrides, &config));
  // The coordinator may run in another directory: the run directory is
  // given as an absolute path (on a filesystem both see).
  overrides.push_back("run_dir=" + fs::absolute(config.run_dir()).lexically_normal().string());
  SubmitRequest req;
  DTRAIN_RETURN_IF_ERROR(MakeSubmitRequest(a.config, overrides, a.resume, a.force, &req));
  std::unique_ptr<coordinator::CoordinatorClient> client;
  DTRAIN_RETURN_IF_ERROR(ConnectCoordinator(a.coordinator, &client));
  SubmitReply reply;
  DTRAIN_RETURN_IF_ERROR(client->Submit(req, &reply));
  std::printf("submitted job %s (run directory %s)\n", reply.job_id().c_str(), reply.run_dir().c_str());
  return Status::OK();
}

Status Stop(const JobArgs& a) {
  std::unique_ptr<coordinator::CoordinatorClient> client;
  DTRAIN_RETURN_IF_ERROR(ConnectCoordinator(a.coordinator, &client));
  JobState state;
  DTRAIN_RETURN_IF_ERROR(client->Stop(a.job, &state));
  std::printf("job %s: %s\n", a.job.c_str(), coordinator::StateName(state).c_str());
  return Status::OK();
}

// A log read either through the coordinator or from a run directory.
class LogSource {
 public:
  virtual ~LogSource() = default;
  virtual Status Read(const LogsRequest& req, LogsReply* reply) = 0;
};

class RemoteLogs final : public LogSource {
 public:
  explicit RemoteLogs(std::unique_ptr<coordinator::CoordinatorClient> c) : client_(std::move(c)) {}
  Status Read(const LogsRequest& req, LogsReply* reply) override {
    return client_->ReadLog(req, reply);
  }

 private:
  std::unique_ptr<coordinator::CoordinatorClient> client_;
};

class LocalLogs final : public LogSource {
 public:
  explicit LocalLogs(std::string dir) : dir_(std::move(dir)) {}
  Status Read(const LogsRequest& req, LogsReply* reply) override {
    std::vector<std::string> names;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir_ + "/logs", ec)) {
      if (e.path().extension() == ".log") names.push_back(e.path().stem().string());
    }
    std::sort(names.begin(), names.end());
    for (const std::string& n : names) reply->add_names(n);
    if (req.name().empty()) return Status::OK();
    if (std::find(names.begin(), names.end(), req.name()) == names.end()) {
      return Status::NotFound(dir_ + "/logs has no " + req.name() + ".log");
    }
    std::ifstream in(dir_ + "/logs/" + req.name() + ".log", std::ios::binary);
    in.seekg(req.offset());
    std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    reply->set_next_offset(req.offset() + static_cast<int64_t>(data.size()));
    reply->set_data(std::move(data));
    reply->set_finished(LatestJobFinished());
    return Status::OK();
  }

 private:
  // The newest job of the run directory's job table is in a final state (or
  // there is no table: nothing will write more).
  bool LatestJobFinished() const {
    std::unique_ptr<coordinator::JobTable> table;
    std::vector<JobRecord> jobs;
    if (!coordinator::JobTable::OpenReadOnly(dir_ + "/coordinator/db", &table).ok() || !table->List(&jobs).ok() ||
        jobs.empty()) {
      return true;
    }
    return coordinator::IsFinal(jobs.back().state());
  }

  std::string dir_;
};

Status Logs(const JobArgs& a) {
  std::unique_ptr<LogSource> source;
  std::string job_id = a.job;
  if (fs::is_directory(a.job)) {
    source = std::make_unique<LocalLogs>(a.job);
  } else {
    if (a.coordinator.address.empty()) {
      return Status::InvalidArgument(a.job + " is not a run directory; for a job id give --coordinator HOST:PORT");
    }
    std::unique_ptr<coordinator::CoordinatorClient> client;
    DTRAIN_RETURN_IF_ERROR(ConnectCoordinator(a.coordinator, &client));
    source = std::make_unique<RemoteLogs>(std::move(client));
  }
  LogsRequest req;
  req.set_job_id(job_id);
  LogsReply listing;
  DTRAIN_RETURN_IF_ERROR(source->Read(req, &listing));
  if (a.process.empty()) {
    if (listing.names().empty()) {
      std::printf("no logs yet\n");
      return Status::OK();
    }
    std::printf("logs (show one with --process NAME):\n");
    for (const std::string& n : listing.names()) std::printf("  %s\n", n.c_str());
    return Status::OK();
  }
  req.set_name(a.process);
  int64_t offset = 0;
  while (true) {
    req.set_offset(offset);
    LogsReply reply;
    DTRAIN_RETURN_IF_ERROR(source->Read(req, &reply));
    std::fwrite(reply.data().data(), 1, reply.data().size(), stdout);
    std::fflush(stdout);
    offset = reply.next_offset();
    if (!reply.data().empty()) continue;  // more may be there already
    if (!a.follow || reply.finished()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  return Status::OK();
}

template <typename Args, typename Fn>
void AddCommand(CLI::App* cmd, std::shared_ptr<Args> args, Fn fn, const char* name, int* exit_code) {
  cmd->callback([args, fn, name, exit_code] {
    Status st = fn(*args);
    if (!st.ok()) {
      std::fprintf(stderr, "dtrain %s: %s\n", name, st.ToString().c_str());
      *exit_code = 1;
    }
  });
}

}  // namespace

void AddJobCommands(CLI::App& app, int* exit_code) {
  auto s = std::make_shared<SubmitArgs>();
  CLI::App* submit = app.add_subcommand("submit", "submit a job to a running dtrain-coordinator; prints the job id");
  submit->add_option("CONFIG", s->config, "job config (configs/*.textproto)")->required()->check(CLI::ExistingFile);
  submit->add_option("--set", s->overrides, "override a config field: --set optimizer.lr=0.05 (repeatable)");
  submit->add_option("--run-dir", s->run_dir, "run directory (default: runs/<job name>, made absolute)");
  submit->add_flag("--resume", s->resume, "continue from the newest good checkpoint of the run's store, if any");
  submit->add_flag("--force", s->force, "use a checkpoint store that another job or model config created");
  AddCoordinatorOptions(submit, &s->coordinator, true);
  AddCommand(submit, s, Submit, "submit", exit_code);

  auto st = std::make_shared<JobArgs>();
  CLI::App* stop = app.add_subcommand("stop", "stop a job of a dtrain-coordinator: every process of it ends");
  stop->add_option("JOB", st->job, "job id (dtrain status --coordinator lists them)")->required();
  AddCoordinatorOptions(stop, &st->coordinator, true);
  AddCommand(stop, st, Stop, "stop", exit_code);

  auto l = std::make_shared<JobArgs>();
  CLI::App* logs = app.add_subcommand(
      "logs", "show a job's logs (launcher, worker-R, ps-S): by job id from a dtrain-coordinator, or from a run "
              "directory");
  logs->add_option("JOB", l->job, "job id, or a run directory")->required();
  logs->add_option("--process,-p", l->process, "the log to show, e.g. worker-1 (default: list them)");
  logs->add_flag("--follow,-f", l->follow, "keep showing new lines until the job ends");
  AddCoordinatorOptions(logs, &l->coordinator, false);
  AddCommand(logs, l, Logs, "logs", exit_code);
}

}  // namespace dtrain::cli
