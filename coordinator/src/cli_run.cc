// dtrain run / dtrain eval.
#include <pthread.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cli_coordinator.h"
#include "dtrain/common/config.h"
#include "dtrain/common/env.h"
#include "dtrain/common/rpc.h"
#include "dtrain/common/metrics_log.h"
#include "dtrain/common/progress.h"
#include "dtrain/coordinator/cli.h"
#include "dtrain/coordinator/coordinator.h"
#include "dtrain/coordinator/index_handoff.h"
#include "dtrain/coordinator/job_table.h"
#include "dtrain/models/registry.h"
#include "dtrain/worker/detector_trainer.h"
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
  int pictures = 8;  // detectors: snaps drawn into RUN_DIR/eval_snaps.png
};

// dtrain run's terminal: the processes' lines as they come and, on a
// terminal, one progress line for the whole job below them.
class LiveView {
 public:
  explicit LiveView(bool bar) : bar_(bar && isatty(STDERR_FILENO) == 1) {}
  bool bar() const { return bar_; }
  void Line(const std::string& line) {
    Around([&] {
      std::fprintf(stdout, "%s\n", line.c_str());
      std::fflush(stdout);
    });
  }
  // Runs `write` (which writes whole lines) with the progress line out of its way.
  void Around(const std::function<void()>& write) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!shown_.empty()) std::fputs("\r\033[K", stderr);
    write();
    if (!shown_.empty()) std::fputs(shown_.c_str(), stderr);
  }
  void Show(const std::string& text) {
    std::lock_guard<std::mutex> lock(mu_);
    shown_ = text;
    std::fprintf(stderr, "\r\033[K%s", text.c_str());
  }
  void End() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!shown_.empty()) std::fputs("\n", stderr);
    shown_.clear();
  }

 private:
  const bool bar_;
  std::mutex mu_;
  std::string shown_;
};

// Processes are (or are about to be) training: the progress line is shown.
// Once they have all exited it goes (the hand-off draws its own).
bool Training(const JobRecord& job) {
  if (job.state() == PENDING || job.state() == LAUNCHING ||
      job.state() == RESTARTING) {
    return true;
  }
  for (const ProcessInfo& p : job.processes()) {
    if (p.role() != LAUNCHER && !p.exited()) return true;
  }
  return false;
}

// The global figures of a job for the progress line.
void UpdateBar(const JobRecord& job, ProgressBar* bar) {
  const coordinator::JobFigures f = coordinator::Summarize(job);
  char buf[64];
  ProgressBar::Fields fields = {{"state", coordinator::StateName(job.state())},
                                {"processes", std::to_string(f.alive) + "/" + std::to_string(f.expected)}};
  // Known after the first logged interval (training.log_every_steps).
  if (f.images_per_sec > 0) {
    std::snprintf(buf, sizeof buf, "%.0f", f.images_per_sec);
    fields.emplace_back("img/s", buf);
    std::snprintf(buf, sizeof buf, "%.4f", f.loss);
    fields.emplace_back("loss", buf);
  }
  if (job.restarts() > 0) fields.emplace_back("restarts", std::to_string(job.restarts()));
  bar->SetTotal(f.total_steps);
  bar->Update(std::max<int64_t>(f.step, 0), fields);
}

// Ctrl-C and SIGTERM stop the job (every process of it) rather than leave
// it behind: the signals are blocked in every thread and one thread waits
// for them.
class StopOnSignal {
 public:
  explicit StopOnSignal(std::function<void()> stop) : stop_(std::move(stop)) {
    sigemptyset(&set_);
    sigaddset(&set_, SIGINT);
    sigaddset(&set_, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set_, &old_);
    thread_ = std::thread([this] {
      while (!done_) {
        timespec ts{0, 200 * 1000 * 1000};
        const int sig = sigtimedwait(&set_, nullptr, &ts);
        if (sig > 0) {
          signalled_ = sig;
          spdlog::warn("{}: stopping the job", strsignal(sig));
          stop_();
        }
      }
    });
  }
  ~StopOnSignal() {
    done_ = true;
    thread_.join();
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  int signalled() const { return signalled_; }

 private:
  std::function<void()> stop_;
  sigset_t set_{}, old_{};
  std::atomic<bool> done_{false};
  std::atomic<int> signalled_{0};
  std::thread thread_;
};

// dtrain run: an embedded coordinator (state in <run dir>/coordinator) runs
// the job through its launchers, recovers failures and hands the model on.
Status Run(const RunArgs& a, int* exit_code) {
  std::vector<std::string> overrides = a.overrides;
  if (!a.run_dir.empty()) overrides.push_back("run_dir=" + a.run_dir);
  JobConfig config;
  DTRAIN_RETURN_IF_ERROR(LoadJobConfig(a.config, overrides, &config));

  auto view = std::make_shared<LiveView>(!a.no_progress && config.training().progress_bar());
  coordinator::CoordinatorOptions o;
  o.state_dir = std::filesystem::absolute(config.run_dir()).string() + "/coordinator";
  o.bind_address = config.launch().bind_address();
  o.port = config.launch().coordinator_port();
  o.token = env::Get(env::kJobToken, "");
  if (o.token.empty()) o.token = rpc::NewJobToken();
  o.echo = [view](const std::string&, const std::string& line) { view->Line(line); };
  o.on_event = [view](const std::string& id, const std::string& event) {
    view->Around([&] { spdlog::info("job {}: {}", id, event); });
  };
  o.hand_off = coordinator::IndexHandOff(!a.no_progress);
  o.recover = false;
  std::unique_ptr<coordinator::Coordinator> c;
  DTRAIN_RETURN_IF_ERROR(coordinator::Coordinator::Start(o, &c));
  spdlog::info("coordinator listening on {} (state in {})", c->address(), o.state_dir);

  SubmitRequest req;
  DTRAIN_RETURN_IF_ERROR(MakeSubmitRequest(a.config, overrides, a.resume, a.force, &req));
  SubmitReply reply;
  DTRAIN_RETURN_IF_ERROR(c->Submit(req, &reply));
  const std::string id = reply.job_id();

  JobRecord job;
  {
    StopOnSignal signals([&c, id] {
      JobState state;
      (void)c->Stop(id, &state);
    });
    std::atomic<bool> finished{false};
    std::thread bar_thread;
    if (view->bar()) {
      bar_thread = std::thread([&] {
        ProgressOptions po;
        po.label = "job " + id;
        po.mode = ProgressOptions::Mode::kTty;
        po.sink = [](const std::string&) {};
        ProgressBar bar(po);
        while (!finished) {
          std::vector<JobRecord> jobs;
          if (c->Jobs(id, &jobs).ok() && !jobs.empty()) {
            if (Training(jobs[0])) {
              UpdateBar(jobs[0], &bar);
              view->Show(bar.Render());
            } else {
              view->End();
            }
          }
          std::this_thread::sleep_for(std::chrono::milliseconds(500));
        }
        view->End();
      });
    }
    const Status waited = c->Wait(id, &job);
    finished = true;
    if (bar_thread.joinable()) bar_thread.join();
    DTRAIN_RETURN_IF_ERROR(waited);
    if (signals.signalled() != 0) *exit_code = 128 + signals.signalled();
  }
  switch (job.state()) {
    case COMPLETED:
      spdlog::info("job {} completed{}; run directory {}", id,
                   job.restarts() > 0 ? " after " + std::to_string(job.restarts()) + " restart(s)" : std::string(),
                   job.run_dir());
      return Status::OK();
    case STOPPED:
      return Status::Aborted("job " + id + " was stopped; `dtrain resume " + job.run_dir() +
                             "` continues it from its newest checkpoint");
    default:
      return Status::Aborted("job " + id + " failed: " + job.reason());
  }
}

// dtrain resume RUN_DIR: the run's resolved config (plus overrides, e.g. a
// longer schedule or another mode), continued from its newest good checkpoint.
Status Resume(const RunArgs& a, int* exit_code) {
  const std::string config_path = a.run_dir + "/config.textproto";
  if (!std::filesystem::exists(config_path)) {
    return Status::NotFound(a.run_dir + " is not a run directory: it has no config.textproto");
  }
  RunArgs r = a;
  r.config = config_path;
  r.resume = true;
  return Run(r, exit_code);
}

// `dtrain eval` of a detector run: AP on the evaluation snaps.
Status EvalDetector(const EvalArgs& a, const JobConfig& config) {
  const std::string model_path = a.model.empty() ? a.run_dir + "/model.pt" : a.model;
  models::CenterNet model{nullptr};
  ModelConfig mc;
  DTRAIN_RETURN_IF_ERROR(worker::LoadDetector(model_path, &model, &mc));
  std::vector<data::Snap> snaps;
  DTRAIN_RETURN_IF_ERROR(worker::LoadEvalSnaps(config, &snaps));
  const DetectionMetrics m =
      worker::EvaluateDetector(*model, models::DetectorCategories(mc), snaps, mc.detector().max_detections());
  std::printf("Detection on %lld evaluation snaps, model %s:\n%s", static_cast<long long>(m.images),
              model_path.c_str(), DetectionTable(m).c_str());
  DTRAIN_RETURN_IF_ERROR(WriteFileAtomically(a.run_dir + "/eval.json", worker::DetectorEvalJson(config, m, nullptr)));
  std::printf("written to %s/eval.json\n", a.run_dir.c_str());
  if (a.pictures > 0) {
    const std::string picture = a.run_dir + "/eval_snaps.png";
    DTRAIN_RETURN_IF_ERROR(worker::WriteDetectionPicture(*model, snaps, a.pictures, 0.3f, picture));
    std::printf("%d snaps with true (green) and detected (red, score >= 0.3) boxes: %s\n", a.pictures, picture.c_str());
  }
  return Status::OK();
}

Status Eval(const EvalArgs& a) {
  const std::string config_path = a.run_dir + "/config.textproto";
  if (!std::filesystem::exists(config_path)) {
    return Status::NotFound(a.run_dir + " is not a run directory: it has no config.textproto");
  }
  JobConfig config;
  DTRAIN_RETURN_IF_ERROR(LoadJobConfig(config_path, a.overrides, &config));
  if (models::IsDetectorModel(config.model().name())) return EvalDetector(a, config);
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
  CLI::App* run = app.add_subcommand(
      "run", "run a job from its config through an embedded coordinator: launch the workers (and shards), watch "
             "them, restart from the newest checkpoint after a failure, evaluate, hand the model to the indexer");
  run->add_option("CONFIG", run_args->config, "job config (configs/*.textproto)")->required()->check(CLI::ExistingFile);
  run->add_option("--set", run_args->overrides, "override a config field: --set optimizer.lr=0.05 (repeatable)");
  run->add_option("--run-dir", run_args->run_dir, "run directory (default: runs/<job name>)");
  run->add_flag("--no-progress", run_args->no_progress, "no progress bar, only log lines");
  run->add_flag("--resume", run_args->resume, "continue from the newest good checkpoint of the run's store, if any");
  run->add_flag("--force", run_args->force, "use a checkpoint store that another job or model config created");
  run->callback([run_args, exit_code] {
    Status st = Run(*run_args, exit_code);
    if (!st.ok()) {
      std::fprintf(stderr, "dtrain run: %s\n", st.ToString().c_str());
      if (*exit_code == 0) *exit_code = 1;
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
    Status st = Resume(*resume_args, exit_code);
    if (!st.ok()) {
      std::fprintf(stderr, "dtrain resume: %s\n", st.ToString().c_str());
      if (*exit_code == 0) *exit_code = 1;
    }
  });

  auto eval_args = std::make_shared<EvalArgs>();
  CLI::App* eval = app.add_subcommand(
      "eval", "evaluate a run's model: an embedder on the Fashion-MNIST test set (Precision@1, R-Precision, MAP@R, "
              "Recall@K) beside the raw-pixel baseline, a detector on its evaluation snaps (AP50, AP75, COCO AP per "
              "category); writes RUN_DIR/eval.json");
  eval->add_option("RUN_DIR", eval_args->run_dir, "run directory of a trained job")->required();
  eval->add_option("--model", eval_args->model, "model file (default: RUN_DIR/model.pt)");
  eval->add_option("--set", eval_args->overrides, "override a config field, e.g. --set data.test_limit=1000");
  eval->add_option("--pictures", eval_args->pictures,
                   "detectors: evaluation snaps drawn with their true and detected boxes into RUN_DIR/eval_snaps.png "
                   "(0: none)")
      ->capture_default_str();
  eval->callback([eval_args, exit_code] {
    Status st = Eval(*eval_args);
    if (!st.ok()) {
      std::fprintf(stderr, "dtrain eval: %s\n", st.ToString().c_str());
      *exit_code = 1;
    }
  });
}

}  // namespace dtrain::cli
