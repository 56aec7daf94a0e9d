#include "dtrain/coordinator/coordinator.h"

#include <netdb.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include "child_process.h"
#include "dtrain/common/config.h"
#include "dtrain/common/env.h"
#include "dtrain/common/rpc.h"
#include "dtrain/coordinator.grpc.pb.h"
#include "dtrain/coordinator/job_table.h"
#include "dtrain/coordinator/mpirun_launcher.h"

namespace dtrain::coordinator {
namespace {

namespace fs = std::filesystem;

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string HostName() {
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  return host;
}

std::string RoleName(ProcessRole role) {
  switch (role) {
    case WORKER: return "worker";
    case PARAM_SERVER: return "ps";
    case LAUNCHER: return "launcher";
    default: return "process";
  }
}

std::string ProcessName(const ProcessInfo& p) { return RoleName(p.role()) + " " + std::to_string(p.rank()); }

std::string Fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

// Failures a restart cannot mend: the same config and data fail the same way.
bool Retryable(int code) {
  const auto c = static_cast<dtrain::Status::Code>(code);
  return c != dtrain::Status::Code::kInvalidArgument && c != dtrain::Status::Code::kNotFound &&
         c != dtrain::Status::Code::kFailedPrecondition;
}

// Every host of a hostfile resolves (an unreachable one then fails in mpirun,
// whose message the job's reason carries).
Status CheckHostfile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Status::NotFound("launch.hostfile: " + path + " does not exist or is not readable");
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    const size_t hash = line.find('#');
    if (hash != std::string::npos) line.resize(hash);
    std::istringstream words(line);
    std::string host;
    if (!(words >> host)) continue;
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    addrinfo* res = nullptr;
    const int rc = getaddrinfo(host.c_str(), nullptr, &hints, &res);
    if (res != nullptr) freeaddrinfo(res);
    if (rc != 0) {
      return Status::InvalidArgument("launch.hostfile " + path + ":" + std::to_string(n) + ": host '" + host +
                                     "' does not resolve (" + gai_strerror(rc) + ")");
    }
  }
  return Status::OK();
}

// A log name of <run dir>/logs: letters, digits, '-', '_', '.'; no "..".
bool SafeLogName(const std::string& name) {
  if (name.empty() || name.find("..") != std::string::npos) return false;
  return std::all_of(name.begin(), name.end(),
                     [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.'; });
}

// One launched process of an attempt, owned by the supervisor thread.
struct Launched {
  std::string name;  // "launcher", "worker-0", "ps-1"
  ProcessRole role = WORKER;
  std::unique_ptr<ChildProcess> child;
  bool done_ok = false;
};

}  // namespace

// ---- the in-memory side of a job ------------------------------------------

struct JobRuntime {
  JobRecord rec;
  JobConfig config;
  std::thread supervisor;
  bool stop_requested = false;
  bool dirty = false;  // progress not yet written to the table
  // Goodbyes of the current attempt: (role, rank) -> code.
  std::map<std::pair<int, int>, int> goodbye_codes;
  // The last lines the launcher and processes wrote (for failure reasons).
  std::deque<std::string> tail;
};

struct Coordinator::Impl {
  CoordinatorOptions options;
  std::unique_ptr<JobTable> table;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<grpc::Service> service;
  std::string address;
  std::string host = HostName();

  mutable std::mutex mu;
  std::condition_variable cv;  // job state changes, stop requests, shutdown
  std::map<std::string, std::unique_ptr<JobRuntime>> jobs;
  bool shutting_down = false;

  // ---- helpers (mu held) ----
  void SaveLocked(JobRuntime& job, bool sync) {
    job.rec.set_updated_ms(NowMs());
    const Status st = table->Put(job.rec, sync);
    if (!st.ok()) spdlog::error("coordinator: {}", st.ToString());
    job.dirty = false;
  }
  void SetStateLocked(JobRuntime& job, JobState state, const std::string& reason) {
    job.rec.set_state(state);
    if (!reason.empty()) job.rec.set_reason(reason);
    if (IsFinal(state)) job.rec.set_finished_ms(NowMs());
    SaveLocked(job, /*sync=*/true);
    cv.notify_all();
  }
  void Event(const std::string& id, const std::string& text) {
    if (options.on_event) {
      options.on_event(id, text);
    } else {
      spdlog::info("job {}: {}", id, text);
    }
  }
  ProcessInfo* FindLocked(JobRuntime& job, int role, int rank) {
    for (ProcessInfo& p : *job.rec.mutable_processes()) {
      if (p.role() == role && p.rank() == rank) return &p;
    }
    return nullptr;
  }
  JobRuntime* JobLocked(const std::string& id) {
    auto it = jobs.find(id);
    return it == jobs.end() ? nullptr : it->second.get();
  }

  Status Submit(const SubmitRequest& request, SubmitReply* reply);
  void StartSupervisor(JobRuntime* job);
  void Supervise(JobRuntime* job);
  // One launch of the job; returns when it ends. *stopped: by a Stop or the
  // coordinator's shutdown (then the status is OK).
  Status Attempt(JobRuntime* job, bool* retryable, bool* stopped);
  Status Launch(JobRuntime* job, std::vector<Launched>* launched);
  void StopProcesses(JobRuntime* job, std::vector<Launched>* launched);
  bool WaitFor(JobRuntime* job, double seconds);  // false when stopped/shutting down
  std::string TailLocked(const JobRuntime& job) const;
  void Recover();
};

// ---- the gRPC service --------------------------------------------------------

class CoordinatorService final : public dtrain::Coordinator::Service {
 public:
  using Impl = dtrain::coordinator::Coordinator::Impl;
  CoordinatorService(dtrain::coordinator::Coordinator* owner, Impl* impl) : owner_(owner), impl_(impl) {}

  grpc::Status Submit(grpc::ServerContext* ctx, const SubmitRequest* req, SubmitReply* reply) override {
    if (grpc::Status a = rpc::CheckJobToken(*ctx, impl_->options.token); !a.ok()) return a;
    return rpc::ToGrpc(owner_->Submit(*req, reply));
  }
  grpc::Status ListJobs(grpc::ServerContext* ctx, const StatusRequest* req, StatusReply* reply) override {
    if (grpc::Status a = rpc::CheckJobToken(*ctx, impl_->options.token); !a.ok()) return a;
    std::vector<JobRecord> jobs;
    if (Status st = owner_->Jobs(req->job_id(), &jobs); !st.ok()) return rpc::ToGrpc(st);
    for (JobRecord& j : jobs) {
      j.clear_token();  // never leaves the coordinator
      *reply->add_jobs() = std::move(j);
    }
    return grpc::Status::OK;
  }
  grpc::Status StopJob(grpc::ServerContext* ctx, const StopRequest* req, StopReply* reply) override {
    if (grpc::Status a = rpc::CheckJobToken(*ctx, impl_->options.token); !a.ok()) return a;
    JobState state = JOB_STATE_UNKNOWN;
    if (Status st = owner_->Stop(req->job_id(), &state); !st.ok()) return rpc::ToGrpc(st);
    reply->set_state(state);
    return grpc::Status::OK;
  }
  grpc::Status ReadLog(grpc::ServerContext* ctx, const LogsRequest* req, LogsReply* reply) override {
    if (grpc::Status a = rpc::CheckJobToken(*ctx, impl_->options.token); !a.ok()) return a;
    std::string run_dir;
    bool finished = false;
    {
      std::lock_guard<std::mutex> lock(impl_->mu);
      JobRuntime* job = impl_->JobLocked(req->job_id());
      if (job == nullptr) return grpc::Status(grpc::StatusCode::NOT_FOUND, "no job '" + req->job_id() + "'");
      run_dir = job->rec.run_dir();
      finished = IsFinal(job->rec.state());
    }
    return rpc::ToGrpc(ReadRunLog(run_dir, *req, finished, reply));
  }

  grpc::Status Register(grpc::ServerContext* ctx, const RegisterRequest* req, RegisterReply* reply) override {
    std::lock_guard<std::mutex> lock(impl_->mu);
    JobRuntime* job = nullptr;
    if (grpc::Status a = CheckProcess(*ctx, req->job_id(), &job); !a.ok()) return a;
    ProcessInfo* p = impl_->FindLocked(*job, req->role(), req->rank());
    if (p == nullptr) return UnknownProcess(*job, req->role(), req->rank());
    p->set_host(req->host());
    p->set_pid(req->pid());
    p->set_registered_ms(NowMs());
    p->set_last_heartbeat_ms(p->registered_ms());
    p->clear_exited();
    impl_->SaveLocked(*job, /*sync=*/false);
    reply->set_heartbeat_interval_s(job->config.launch().heartbeat_interval_s());
    reply->set_attempt(job->rec.attempt());
    return grpc::Status::OK;
  }
  grpc::Status Heartbeat(grpc::ServerContext* ctx, const HeartbeatRequest* req, HeartbeatReply*) override {
    std::lock_guard<std::mutex> lock(impl_->mu);
    JobRuntime* job = nullptr;
    if (grpc::Status a = CheckProcess(*ctx, req->job_id(), &job); !a.ok()) return a;
    ProcessInfo* p = impl_->FindLocked(*job, req->role(), req->rank());
    if (p == nullptr) return UnknownProcess(*job, req->role(), req->rank());
    if (!p->has_registered_ms()) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, ProcessName(*p) + " has not registered");
    }
    if (req->has_progress() && req->progress().step() < 0) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "progress.step is negative");
    }
    p->set_last_heartbeat_ms(NowMs());
    if (req->has_progress()) *p->mutable_progress() = req->progress();
    job->dirty = true;
    return grpc::Status::OK;
  }
  grpc::Status Goodbye(grpc::ServerContext* ctx, const GoodbyeRequest* req, GoodbyeReply*) override {
    std::lock_guard<std::mutex> lock(impl_->mu);
    JobRuntime* job = nullptr;
    if (grpc::Status a = CheckProcess(*ctx, req->job_id(), &job); !a.ok()) return a;
    ProcessInfo* p = impl_->FindLocked(*job, req->role(), req->rank());
    if (p == nullptr) return UnknownProcess(*job, req->role(), req->rank());
    p->set_exited(true);
    p->set_exit_ok(req->ok());
    if (!req->ok()) p->set_exit_message(req->message());
    job->goodbye_codes[{req->role(), req->rank()}] = req->ok() ? 0 : req->code();
    impl_->SaveLocked(*job, /*sync=*/false);
    impl_->cv.notify_all();
    return grpc::Status::OK;
  }

  static Status ReadRunLog(const std::string& run_dir, const LogsRequest& req, bool finished, LogsReply* reply) {
    const fs::path dir = fs::path(run_dir) / "logs";
    std::error_code ec;
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      if (e.path().extension() == ".log") names.push_back(e.path().stem().string());
    }
    std::sort(names.begin(), names.end());
    for (const std::string& n : names) reply->add_names(n);
    reply->set_finished(finished);
    if (req.name().empty()) return Status::OK();
    if (!SafeLogName(req.name())) return Status::InvalidArgument("'" + req.name() + "' is not a log name");
    if (std::find(names.begin(), names.end(), req.name()) == names.end()) {
      return Status::NotFound("the job has no log '" + req.name() + "' (it has: " +
                              (names.empty() ? std::string("none yet") : [&] {
                                std::string s;
                                for (const std::string& n : names) s += (s.empty() ? "" : ", ") + n;
                                return s;
                              }()) +
                              ")");
    }
    if (req.offset() < 0) return Status::InvalidArgument("offset is negative");
    const int max_bytes = req.max_bytes() > 0 ? std::min(req.max_bytes(), 1 << 20) : (1 << 20);
    std::ifstream in(dir / (req.name() + ".log"), std::ios::binary);
    in.seekg(0, std::ios::end);
    const int64_t size = static_cast<int64_t>(in.tellg());
    const int64_t offset = std::min<int64_t>(req.offset(), size);
    in.seekg(offset);
    std::string data(static_cast<size_t>(std::min<int64_t>(size - offset, max_bytes)), '\0');
    in.read(data.data(), static_cast<std::streamsize>(data.size()));
    data.resize(static_cast<size_t>(in.gcount()));
    reply->set_size(size);
    reply->set_next_offset(offset + static_cast<int64_t>(data.size()));
    reply->set_data(std::move(data));
    return Status::OK();
  }

 private:
  // The job's own token (mu held). An unknown job gets the same answer as a
  // wrong token: a caller without the token learns nothing.
  grpc::Status CheckProcess(const grpc::ServerContext& ctx, const std::string& job_id, JobRuntime** job) {
    JobRuntime* j = impl_->JobLocked(job_id);
    grpc::Status a = rpc::CheckJobToken(ctx, j == nullptr ? std::string() : j->rec.token());
    if (!a.ok()) return a;
    if (IsFinal(j->rec.state())) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "job " + job_id + " is " + StateName(j->rec.state()));
    }
    *job = j;
    return grpc::Status::OK;
  }
  static grpc::Status UnknownProcess(const JobRuntime& job, int role, int rank) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "job " + job.rec.id() + " has no " + RoleName(static_cast<ProcessRole>(role)) + " of rank " +
                            std::to_string(rank));
  }

  dtrain::coordinator::Coordinator* owner_;
  Impl* impl_;
};

// ---- Coordinator ---------------------------------------------------------------

Coordinator::Coordinator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Status Coordinator::Start(CoordinatorOptions options, std::unique_ptr<Coordinator>* coordinator) {
  if (options.token.empty()) return Status::InvalidArgument("the coordinator needs a token");
  if (options.state_dir.empty()) return Status::InvalidArgument("the coordinator needs a state directory");
  if (options.bin_dir.empty()) options.bin_dir = ProgramDir();
  auto impl = std::make_unique<Impl>();
  impl->options = std::move(options);
  DTRAIN_RETURN_IF_ERROR(JobTable::Open(impl->options.state_dir + "/db", &impl->table));
  std::unique_ptr<Coordinator> c(new Coordinator(std::move(impl)));
  Impl& m = *c->impl_;
  m.service = std::make_unique<CoordinatorService>(c.get(), &m);
  rpc::ServerSetup setup;
  setup.bind_address = m.options.bind_address;
  setup.port = m.options.port;
  int port = 0;
  DTRAIN_RETURN_IF_ERROR(rpc::StartServer(setup, m.service.get(), &m.server, &port));
  const std::string& bind = m.options.bind_address;
  m.address = (bind == "0.0.0.0" || bind == "::" || bind == "[::]" ? m.host : bind) + ":" + std::to_string(port);
  m.Recover();
  *coordinator = std::move(c);
  return Status::OK();
}

Coordinator::~Coordinator() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->shutting_down = true;
  }
  impl_->cv.notify_all();
  for (auto& [id, job] : impl_->jobs) {
    if (job->supervisor.joinable()) job->supervisor.join();
  }
  rpc::StopServer(&impl_->server);
}

std::string Coordinator::address() const { return impl_->address; }

Status Coordinator::Submit(const SubmitRequest& request, SubmitReply* reply) { return impl_->Submit(request, reply); }

Status Coordinator::Jobs(const std::string& id, std::vector<JobRecord>* jobs) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  jobs->clear();
  for (const auto& [job_id, job] : impl_->jobs) {
    if (id.empty() || id == job_id) jobs->push_back(job->rec);
  }
  if (!id.empty() && jobs->empty()) return Status::NotFound("no job '" + id + "'");
  std::sort(jobs->begin(), jobs->end(), [](const JobRecord& a, const JobRecord& b) {
    return a.submitted_ms() != b.submitted_ms() ? a.submitted_ms() < b.submitted_ms() : a.id() < b.id();
  });
  return Status::OK();
}

Status Coordinator::Stop(const std::string& id, JobState* state) {
  std::unique_lock<std::mutex> lock(impl_->mu);
  JobRuntime* job = impl_->JobLocked(id);
  if (job == nullptr) return Status::NotFound("no job '" + id + "'");
  if (!IsFinal(job->rec.state())) {
    job->stop_requested = true;
    impl_->cv.notify_all();
    // The supervisor stops the processes (step 7) and records STOPPED.
    impl_->cv.wait(lock, [&] { return IsFinal(job->rec.state()) || impl_->shutting_down; });
  }
  *state = job->rec.state();
  return Status::OK();
}

Status Coordinator::Wait(const std::string& id, JobRecord* record) {
  std::unique_lock<std::mutex> lock(impl_->mu);
  JobRuntime* job = impl_->JobLocked(id);
  if (job == nullptr) return Status::NotFound("no job '" + id + "'");
  impl_->cv.wait(lock, [&] { return IsFinal(job->rec.state()) || impl_->shutting_down; });
  *record = job->rec;
  return Status::OK();
}

// ---- step 1: submit ------------------------------------------------------------

Status Coordinator::Impl::Submit(const SubmitRequest& request, SubmitReply* reply) {
  JobConfig config;
  const std::string origin = request.origin().empty() ? "submitted config" : request.origin();
  DTRAIN_RETURN_IF_ERROR(ParseJobConfig(request.config_text(), origin, {request.overrides().begin(),
                                                                          request.overrides().end()}, &config));
  std::error_code ec;
  config.set_run_dir(fs::absolute(config.run_dir(), ec).lexically_normal().string());
  const LaunchConfig& l = config.launch();
  if (l.launcher() == LaunchConfig::MPIRUN && !l.hostfile().empty()) DTRAIN_RETURN_IF_ERROR(CheckHostfile(l.hostfile()));
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& [id, job] : jobs) {
    if (!IsFinal(job->rec.state()) && job->rec.run_dir() == config.run_dir()) {
      return Status::AlreadyExists("job " + id + " is already " + StateName(job->rec.state()) + " in " +
                                   config.run_dir() + "; stop it first or pick another --run-dir");
    }
  }
  int64_t number = 0;
  DTRAIN_RETURN_IF_ERROR(table->NextJobNumber(&number));
  auto job = std::make_unique<JobRuntime>();
  JobRecord& r = job->rec;
  r.set_id(config.name() + "-" + std::to_string(number));
  r.set_name(config.name());
  r.set_config_text(FormatJobConfig(config));
  r.set_config_path(options.state_dir + "/jobs/" + r.id() + ".textproto");
  r.set_run_dir(config.run_dir());
  r.set_state(PENDING);
  r.set_submitted_ms(NowMs());
  r.set_token(rpc::NewJobToken());
  r.set_resume(request.resume());
  r.set_force(request.force());
  DTRAIN_RETURN_IF_ERROR(WriteResolvedConfig(config, r.config_path()));
  job->config = std::move(config);
  SaveLocked(*job, /*sync=*/true);
  reply->set_job_id(r.id());
  reply->set_run_dir(r.run_dir());
  JobRuntime* raw = job.get();
  jobs[r.id()] = std::move(job);
  StartSupervisor(raw);
  return Status::OK();
}

void Coordinator::Impl::StartSupervisor(JobRuntime* job) {
  job->supervisor = std::thread([this, job] { Supervise(job); });
}

// ---- steps 2-7: the supervisor ---------------------------------------------------

bool Coordinator::Impl::WaitFor(JobRuntime* job, double seconds) {
  std::unique_lock<std::mutex> lock(mu);
  cv.wait_for(lock, std::chrono::duration<double>(seconds), [&] { return job->stop_requested || shutting_down; });
  return !job->stop_requested && !shutting_down;
}

std::string Coordinator::Impl::TailLocked(const JobRuntime& job) const {
  // The most telling of the last lines, if any: an error or mpirun's report.
  for (auto it = job.tail.rbegin(); it != job.tail.rend(); ++it) {
    const std::string& l = *it;
    if (l.find("rror") != std::string::npos || l.find("noticed") != std::string::npos ||
        l.find("dtrain-worker:") != std::string::npos || l.find("dtrain-ps:") != std::string::npos) {
      return l;
    }
  }
  return std::string();
}

void Coordinator::Impl::Supervise(JobRuntime* job) {
  const LaunchConfig& l = job->config.launch();
  while (true) {
    bool retryable = true, stopped = false;
    const Status outcome = Attempt(job, &retryable, &stopped);
    std::unique_lock<std::mutex> lock(mu);
    if (shutting_down) return;  // the state stays: the next coordinator recovers the job
    if (stopped) {
      SetStateLocked(*job, STOPPED, "stopped by request");
      lock.unlock();
      Event(job->rec.id(), "stopped; every process of the job has ended");
      return;
    }
    if (outcome.ok()) {
      lock.unlock();
      std::string summary;
      Status handed = Status::OK();
      if (options.hand_off) {
        Event(job->rec.id(), "the workers finished");
        handed = options.hand_off(job->config, &summary);
      }
      lock.lock();
      if (!summary.empty()) job->rec.set_handoff(summary);
      if (handed.ok()) {
        SetStateLocked(*job, COMPLETED, "");
        lock.unlock();
        Event(job->rec.id(), "completed" + (summary.empty() ? std::string() : "; " + summary));
      } else {
        SetStateLocked(*job, FAILED, "the hand-off to the index builder failed: " + handed.ToString() +
                                         " (the model is in " + job->rec.run_dir() + ")");
        lock.unlock();
        Event(job->rec.id(), "failed: " + job->rec.reason());
      }
      return;
    }
    const std::string reason = outcome.message();
    if (!retryable || job->rec.restarts() >= l.max_restarts()) {
      const std::string why =
          !retryable ? reason + " (a restart would fail the same way)"
                     : "failed " + std::to_string(job->rec.restarts() + 1) + " time(s), out of restarts (launch.max_restarts " +
                           std::to_string(l.max_restarts()) + "); last failure: " + reason;
      SetStateLocked(*job, FAILED, why);
      lock.unlock();
      Event(job->rec.id(), "failed: " + why);
      return;
    }
    const double backoff =
        std::min(60.0, static_cast<double>(l.restart_backoff_s()) * std::pow(2.0, job->rec.restarts()));
    job->rec.set_restarts(job->rec.restarts() + 1);
    SetStateLocked(*job, RESTARTING, reason);
    lock.unlock();
    Event(job->rec.id(), "failure: " + reason + "; restart " + std::to_string(job->rec.restarts()) + " of " +
                             std::to_string(l.max_restarts()) + " from the latest checkpoint in " +
                             Fixed(backoff, 1) + " s");
    if (!WaitFor(job, backoff)) {
      lock.lock();
      if (shutting_down) return;
      SetStateLocked(*job, STOPPED, "stopped by request");
      lock.unlock();
      Event(job->rec.id(), "stopped while waiting to restart");
      return;
    }
  }
}

Status Coordinator::Impl::Launch(JobRuntime* job, std::vector<Launched>* launched) {
  const JobConfig& config = job->config;
  const LaunchConfig& l = config.launch();
  const bool async = config.parallelism().mode_case() == ParallelismConfig::kAsync;
  const bool resume = job->rec.resume() || job->rec.attempt() > 1;
  const std::string logs = job->rec.run_dir() + "/logs";
  std::vector<std::pair<std::string, std::string>> env = {
      {env::kCoordinator, address}, {env::kJobId, job->rec.id()}, {env::kJobToken, job->rec.token()}};
  const std::string id = job->rec.id();
  auto echo = [this, job, id](const std::string& line) {
    {
      std::lock_guard<std::mutex> lock(mu);
      job->tail.push_back(line);
      if (job->tail.size() > 40) job->tail.pop_front();
    }
    if (options.echo) options.echo(id, line);
  };
  auto start = [&](const std::string& name, ProcessRole role, std::vector<std::string> argv,
                   std::vector<std::pair<std::string, std::string>> extra_env) -> Status {
    ChildSpec spec;
    spec.argv = std::move(argv);
    spec.env = env;
    spec.env.insert(spec.env.end(), extra_env.begin(), extra_env.end());
    // The coordinator draws the progress; the processes write log lines.
    spec.unset_env = {env::kProgress};
    spec.log_path = logs + "/" + name + ".log";
    // A separator in logs that carry on across attempts.
    std::ofstream(spec.log_path, std::ios::app) << "==== job " << id << ", attempt " << job->rec.attempt() << " ====\n";
    spec.echo = echo;
    Event(id, "attempt " + std::to_string(job->rec.attempt()) + ": starting " + name + ": " + CommandLine(spec.argv));
    Launched p;
    p.name = name;
    p.role = role;
    DTRAIN_RETURN_IF_ERROR(ChildProcess::Start(spec, &p.child));
    {
      std::lock_guard<std::mutex> lock(mu);
      if (role == LAUNCHER || launched->empty()) job->rec.set_launcher_pgid(p.child->pid());
      if (role == LAUNCHER) {
        ProcessInfo* info = job->rec.add_processes();
        info->set_role(LAUNCHER);
        info->set_rank(0);
        info->set_host(host);
        info->set_pid(p.child->pid());
        info->set_attempt(job->rec.attempt());
        info->set_registered_ms(NowMs());
      }
      SaveLocked(*job, /*sync=*/true);
    }
    launched->push_back(std::move(p));
    return Status::OK();
  };
  std::error_code ec;
  fs::create_directories(logs, ec);
  std::vector<std::string> worker_args = {"--config", job->rec.config_path()};
  if (resume) worker_args.push_back("--resume");
  if (job->rec.force()) worker_args.push_back("--force");

  if (l.workers() > 1 || l.launcher() == LaunchConfig::MPIRUN) {
    MpirunRequest req;
    req.config_path = job->rec.config_path();
    req.resume = resume;
    req.force = job->rec.force();
    req.worker_binary = options.bin_dir + "/dtrain-worker";
    req.ps_binary = options.bin_dir + "/dtrain-ps";
    req.mpirun_script = options.mpirun_script;
    std::vector<std::string> argv;
    DTRAIN_RETURN_IF_ERROR(BuildMpirunCommand(config, req, &argv));
    return start("launcher", LAUNCHER, argv, {{env::kLogDir, logs}});
  }
  // LOCAL, one worker: the shards of an async job first, standalone.
  std::string ps_addresses;
  if (async) {
    const int shards = config.parallelism().async().shards();
    std::vector<std::string> port_files;
    for (int s = 0; s < shards; ++s) {
      const std::string port_file = options.state_dir + "/jobs/" + id + ".ps" + std::to_string(s) + ".port";
      fs::remove(port_file, ec);
      port_files.push_back(port_file);
      DTRAIN_RETURN_IF_ERROR(start("ps-" + std::to_string(s), PARAM_SERVER,
                                   {options.bin_dir + "/dtrain-ps", "--config", job->rec.config_path(), "--shard",
                                    std::to_string(s), "--port-file", port_file},
                                   {}));
    }
    const std::string& bind = l.bind_address();
    const std::string ps_host = bind == "0.0.0.0" || bind == "::" ? host : bind;
    for (int s = 0; s < shards; ++s) {
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
      std::string port;
      while (port.empty()) {
        std::ifstream(port_files[s]) >> port;
        if (!port.empty()) break;
        Launched& shard = (*launched)[static_cast<size_t>(s)];
        int ws = 0;
        if (shard.child->Poll(&ws)) return Status::Aborted("ps-" + std::to_string(s) + " " + ChildProcess::DescribeExit(ws) + " before it listened");
        if (std::chrono::steady_clock::now() > deadline) return Status::DeadlineExceeded("ps-" + std::to_string(s) + " did not listen within 60 s");
        if (!WaitFor(job, 0.05)) return Status::OK();
      }
      ps_addresses += (ps_addresses.empty() ? "" : ",") + ps_host + ":" + port;
    }
  }
  std::vector<std::string> argv = {options.bin_dir + "/dtrain-worker"};
  argv.insert(argv.end(), worker_args.begin(), worker_args.end());
  std::vector<std::pair<std::string, std::string>> extra;
  if (async) extra.emplace_back(env::kPsAddresses, ps_addresses);
  return start("worker-0", WORKER, argv, extra);
}

void Coordinator::Impl::StopProcesses(JobRuntime* job, std::vector<Launched>* launched) {
  // Workers first (an async job's shards wait for them), then the rest.
  for (ProcessRole role : {WORKER, LAUNCHER, PARAM_SERVER}) {
    for (Launched& p : *launched) {
      if (p.role == role) p.child->Stop(options.stop_grace_s);
    }
  }
  // Registered processes on this host that outlived their launcher (an
  // mpirun killed before it could end its ranks).
  std::vector<pid_t> pids;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (const ProcessInfo& p : job->rec.processes()) {
      if (p.role() != LAUNCHER && p.pid() > 0 && p.host() == host && !p.exited()) pids.push_back(p.pid());
    }
  }
  for (pid_t pid : pids) {
    if (ProcessAlive(pid)) {
      kill(pid, SIGCONT);
      kill(pid, SIGKILL);
    }
  }
  launched->clear();  // joins the output readers
}

Status Coordinator::Impl::Attempt(JobRuntime* job, bool* retryable, bool* stopped) {
  const JobConfig& config = job->config;
  const LaunchConfig& l = config.launch();
  const bool async = config.parallelism().mode_case() == ParallelismConfig::kAsync;
  const int workers = l.workers();
  const int shards = async ? config.parallelism().async().shards() : 0;
  {
    // Step 2.
    std::lock_guard<std::mutex> lock(mu);
    job->rec.set_attempt(job->rec.attempt() + 1);
    job->rec.clear_processes();
    job->rec.clear_stalled();
    job->goodbye_codes.clear();
    job->tail.clear();
    for (int r = 0; r < workers + shards; ++r) {
      ProcessInfo* p = job->rec.add_processes();
      p->set_role(r < shards ? PARAM_SERVER : WORKER);
      p->set_rank(r < shards ? r : r - shards);
      p->set_attempt(job->rec.attempt());
    }
    SetStateLocked(*job, LAUNCHING, "");
  }
  std::vector<Launched> launched;
  Status st = Launch(job, &launched);
  auto fail = [&](const Status& why, bool can_retry) {
    StopProcesses(job, &launched);
    *retryable = can_retry;
    return why;
  };
  if (!st.ok()) return fail(st.WithContext("launching"), /*can_retry=*/st.code() != Status::Code::kNotFound &&
                                                                       st.code() != Status::Code::kInvalidArgument);
  const auto launch_time = std::chrono::steady_clock::now();
  const double register_timeout_s = std::max(3.0 * l.heartbeat_timeout_s(), 60.0);
  const int64_t heartbeat_timeout_ms = static_cast<int64_t>(1000.0 * l.heartbeat_timeout_s());
  int64_t furthest = -1;
  auto last_progress = std::chrono::steady_clock::now();
  auto last_save = last_progress;

  while (true) {
    if (!WaitFor(job, options.poll_interval_s)) {
      StopProcesses(job, &launched);
      *stopped = true;
      return Status::OK();
    }
    // 4a: exits.
    bool all_workers_done = !launched.empty();
    bool launcher_done = false;
    for (Launched& p : launched) {
      int ws = 0;
      if (!p.done_ok && p.child->Poll(&ws)) {
        if (WIFEXITED(ws) && WEXITSTATUS(ws) == 0 && p.role != PARAM_SERVER) {
          p.done_ok = true;
        } else {
          std::string why = p.name + " " + ChildProcess::DescribeExit(ws);
          bool can_retry = true;
          {
            std::lock_guard<std::mutex> lock(mu);
            for (const ProcessInfo& info : job->rec.processes()) {
              if (info.exited() && !info.exit_ok()) {
                why += "; " + ProcessName(info) + ": " + info.exit_message();
                can_retry = Retryable(job->goodbye_codes[{info.role(), info.rank()}]);
                break;
              }
            }
            const std::string tail = TailLocked(*job);
            if (why.find(';') == std::string::npos && !tail.empty()) why += ": " + tail;
          }
          return fail(Status::Aborted(why), can_retry);
        }
      }
      if (p.role == LAUNCHER && p.done_ok) launcher_done = true;
      if (p.role == WORKER && !p.done_ok) all_workers_done = false;
      if (p.role == LAUNCHER) all_workers_done = false;
    }
    if (launcher_done || all_workers_done) {
      StopProcesses(job, &launched);  // an async LOCAL job's shards
      return Status::OK();
    }

    std::lock_guard<std::mutex> lock(mu);
    const int64_t now = NowMs();
    const double since_launch =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - launch_time).count();
    bool all_registered = true;
    int64_t max_step = -1;
    std::string failure;
    bool can_retry = true;
    for (const ProcessInfo& p : job->rec.processes()) {
      if (p.role() == LAUNCHER) continue;
      if (p.exited() && !p.exit_ok()) {
        // A goodbye with a failure: under mpirun the launcher ends soon; a
        // failure no restart mends ends the attempt now.
        const int code = job->goodbye_codes[{p.role(), p.rank()}];
        if (!Retryable(code)) {
          failure = ProcessName(p) + ": " + p.exit_message();
          can_retry = false;
          break;
        }
        continue;
      }
      if (!p.has_registered_ms()) {
        all_registered = false;
        if (since_launch > register_timeout_s) {
          failure = ProcessName(p) + " did not register within " + Fixed(register_timeout_s, 0) + " s of the launch";
          break;
        }
        continue;
      }
      if (!p.exited() && now - p.last_heartbeat_ms() > heartbeat_timeout_ms) {
        failure = ProcessName(p) + " (pid " + std::to_string(p.pid()) + " on " + p.host() + ") sent no heartbeat for " +
                  Fixed(static_cast<double>(now - p.last_heartbeat_ms()) / 1000.0, 1) +
                  " s (launch.heartbeat_timeout_s " + Fixed(l.heartbeat_timeout_s(), 1) + ")";
        break;
      }
      if (p.role() == WORKER) max_step = std::max<int64_t>(max_step, p.progress().step());
    }
    if (!failure.empty()) {
      // Unlock before stopping: the processes' last calls need the lock.
      mu.unlock();
      const Status why = fail(Status::Aborted(failure), can_retry);
      mu.lock();
      return why;
    }
    // Step 3: the state follows the processes.
    if (all_registered) {
      const ProcessInfo* chief = nullptr;
      for (const ProcessInfo& p : job->rec.processes()) {
        if (p.role() == WORKER && p.rank() == 0) chief = &p;
      }
      const JobState want = chief != nullptr && chief->progress().phase() == "checkpointing" ? CHECKPOINTING : RUNNING;
      if (job->rec.state() != want) {
        const bool first = job->rec.state() == LAUNCHING;
        SetStateLocked(*job, want, "");
        if (first) {
          mu.unlock();
          Event(job->rec.id(), "running: " + std::to_string(workers) + " worker(s)" +
                                   (shards > 0 ? " and " + std::to_string(shards) + " shard(s)" : std::string()) +
                                   " registered");
          mu.lock();
        }
      }
    }
    // 4b: stalls.
    const auto t = std::chrono::steady_clock::now();
    if (max_step > furthest) {
      furthest = max_step;
      last_progress = t;
      if (job->rec.has_stalled()) {
        job->rec.clear_stalled();
        job->dirty = true;
      }
    } else if (all_registered && std::chrono::duration<double>(t - last_progress).count() > l.stall_timeout_s() &&
               !job->rec.has_stalled()) {
      std::string behind;
      for (const ProcessInfo& p : job->rec.processes()) {
        if (p.role() == WORKER && p.progress().step() < furthest) {
          behind += (behind.empty() ? "" : ", ") + ProcessName(p) + " at step " + std::to_string(p.progress().step());
        }
      }
      job->rec.set_stalled("no progress for " + Fixed(std::chrono::duration<double>(t - last_progress).count(), 0) +
                           " s at step " + std::to_string(furthest) + "; " +
                           (behind.empty() ? std::string("every worker is there") : "behind: " + behind));
      SaveLocked(*job, /*sync=*/true);
      mu.unlock();
      Event(job->rec.id(), "stalled: " + job->rec.stalled());
      mu.lock();
    }
    if (job->dirty && std::chrono::duration<double>(t - last_save).count() >= 1.0) {
      SaveLocked(*job, /*sync=*/false);
      last_save = t;
    }
  }
}

// ---- step 8: recovery --------------------------------------------------------------

namespace {

// True when `pid` runs a dtrain program or mpirun (a pid recorded by a dead
// coordinator may since belong to something else).
bool RunsOurProgram(pid_t pid) {
  if (!ProcessAlive(pid)) return false;
  std::ifstream cmd("/proc/" + std::to_string(pid) + "/cmdline");
  const std::string text((std::istreambuf_iterator<char>(cmd)), std::istreambuf_iterator<char>());
  return text.find("dtrain") != std::string::npos || text.find("mpirun") != std::string::npos;
}

}  // namespace

void Coordinator::Impl::Recover() {
  std::vector<JobRecord> records;
  if (Status st = table->List(&records); !st.ok()) {
    spdlog::error("coordinator: cannot read the job table: {}", st.ToString());
    return;
  }
  std::lock_guard<std::mutex> lock(mu);
  for (JobRecord& r : records) {
    auto job = std::make_unique<JobRuntime>();
    const bool unfinished = !IsFinal(r.state());
    if (unfinished) {
      // What a dead predecessor left running.
      if (r.launcher_pgid() > 0 && RunsOurProgram(r.launcher_pgid())) kill(-r.launcher_pgid(), SIGKILL);
      for (const ProcessInfo& p : r.processes()) {
        if (p.pid() > 0 && p.host() == host && RunsOurProgram(p.pid())) kill(p.pid(), SIGKILL);
      }
    }
    Status parsed = ParseJobConfig(r.config_text(), "job " + r.id(), {}, &job->config);
    job->rec = std::move(r);
    JobRuntime* raw = job.get();
    const std::string id = raw->rec.id();
    jobs[id] = std::move(job);
    if (!unfinished) continue;
    if (!parsed.ok()) {
      SetStateLocked(*raw, FAILED, "its stored config no longer loads: " + parsed.ToString());
    } else if (!options.recover) {
      SetStateLocked(*raw, STOPPED, "its coordinator ended before it did; `dtrain resume " + raw->rec.run_dir() +
                                        "` continues it from its newest checkpoint");
    } else {
      raw->rec.set_resume(true);
      raw->rec.set_reason("recovered by a restarted coordinator; resuming from the newest checkpoint");
      SaveLocked(*raw, /*sync=*/true);
      spdlog::info("job {}: {}", id, raw->rec.reason());
      if (!fs::exists(raw->rec.config_path())) (void)WriteResolvedConfig(raw->config, raw->rec.config_path());
      StartSupervisor(raw);
    }
  }
}

// ---- presentation ------------------------------------------------------------------

JobFigures Summarize(const JobRecord& job) {
  JobFigures f;
  for (const ProcessInfo& p : job.processes()) {
    if (p.role() == LAUNCHER) continue;
    ++f.expected;
    if (p.has_registered_ms() && !p.exited()) ++f.alive;
    if (p.role() != WORKER) continue;
    if (p.progress().has_step()) f.step = std::max<int64_t>(f.step, p.progress().step());
    f.total_steps = std::max<int64_t>(f.total_steps, p.progress().total_steps());
    f.images_per_sec += p.progress().images_per_sec();
    if (p.rank() == 0 && p.progress().has_loss()) {
      f.loss = p.progress().loss();
      f.has_loss = true;
    }
  }
  return f;
}

std::string DescribeJob(const JobRecord& job) {
  std::string s = StateName(job.state());
  const JobFigures f = Summarize(job);
  if (f.step >= 0) {
    s += ", step " + std::to_string(f.step) + (f.total_steps > 0 ? "/" + std::to_string(f.total_steps) : "");
  }
  if (!IsFinal(job.state()) && f.expected > 0) {
    s += ", " + std::to_string(f.alive) + "/" + std::to_string(f.expected) + " processes";
  }
  if (!IsFinal(job.state()) && f.images_per_sec > 0) s += ", " + Fixed(f.images_per_sec, 0) + " img/s";
  if (f.has_loss) s += ", loss " + Fixed(f.loss, 4);
  if (job.restarts() > 0) s += ", " + std::to_string(job.restarts()) + " restart(s)";
  return s;
}

std::string JobsTable(const std::vector<JobRecord>& jobs, bool processes, int64_t now_ms) {
  std::string out;
  char line[512];
  std::snprintf(line, sizeof line, "%-24s %-13s %-8s %8s %-s\n", "JOB", "STATE", "RESTARTS", "AGE", "PROGRESS / RUN DIR");
  out += line;
  for (const JobRecord& j : jobs) {
    const double age = static_cast<double>(now_ms - j.submitted_ms()) / 1000.0;
    std::snprintf(line, sizeof line, "%-24s %-13s %-8d %7.0fs %s\n", j.id().c_str(), StateName(j.state()).c_str(),
                  j.restarts(), age, DescribeJob(j).c_str());
    out += line;
    out += "    run dir " + j.run_dir() + "\n";
    if (!j.reason().empty()) out += "    reason: " + j.reason() + "\n";
    if (!j.stalled().empty()) out += "    STALLED: " + j.stalled() + "\n";
    if (!j.handoff().empty()) out += "    hand-off: " + j.handoff() + "\n";
    if (!processes || j.processes().empty()) continue;
    std::snprintf(line, sizeof line, "    %-12s %-16s %8s %10s %9s %10s %-s\n", "PROCESS", "HOST", "PID", "STEP",
                  "IMG/S", "HEARTBEAT", "STATE");
    out += line;
    for (const ProcessInfo& p : j.processes()) {
      std::string state, heartbeat = "-";
      if (p.role() == LAUNCHER) {
        state = IsFinal(j.state()) ? "ended" : "running";
      } else if (!p.has_registered_ms()) {
        state = "not registered";
      } else if (p.exited()) {
        state = p.exit_ok() ? "exited ok" : "failed: " + p.exit_message();
      } else {
        state = p.progress().phase().empty() ? "alive" : p.progress().phase();
        heartbeat = Fixed(static_cast<double>(now_ms - p.last_heartbeat_ms()) / 1000.0, 1) + "s ago";
      }
      const std::string step = p.progress().has_step() ? std::to_string(p.progress().step()) : "-";
      const std::string ips = p.progress().images_per_sec() > 0 ? Fixed(p.progress().images_per_sec(), 0) : "-";
      // Every column prints a word ("-" when empty), so that scripts can split rows on blanks.
      const std::string host = p.host().empty() ? "-" : p.host();
      const std::string pid = p.pid() > 0 ? std::to_string(p.pid()) : "-";
      std::snprintf(line, sizeof line, "    %-12s %-16s %8s %10s %9s %10s %s\n", ProcessName(p).c_str(),
                    host.c_str(), pid.c_str(), step.c_str(), ips.c_str(), heartbeat.c_str(), state.c_str());
      out += line;
    }
  }
  return out;
}

}  // namespace dtrain::coordinator
