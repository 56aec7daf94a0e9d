#include "dtrain/coordinator/mpirun_launcher.h"

#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <cstdlib>
#include <filesystem>

#include "dtrain/common/env.h"

namespace dtrain::coordinator {
namespace {

std::string SelfDir() {
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string(".") : exe.parent_path().string();
}

std::string Quote(const std::string& s) {
  if (s.find_first_of(" \t'\"$\\") == std::string::npos) return s;
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

volatile sig_atomic_t g_child = 0;

void ForwardSignal(int sig) {
  if (g_child > 0) kill(static_cast<pid_t>(g_child), sig);
}

}  // namespace

Status BuildMpirunCommand(const JobConfig& config, const MpirunRequest& request, std::vector<std::string>* argv) {
  const std::string worker = request.worker_binary.empty() ? SelfDir() + "/dtrain-worker" : request.worker_binary;
  const std::string script =
      request.mpirun_script.empty() ? std::string(DTRAIN_SOURCE_DIR) + "/launch/mpirun.sh" : request.mpirun_script;
  if (access(worker.c_str(), X_OK) != 0) {
    return Status::NotFound("the worker program " + worker + " is missing or not executable (build dtrain-worker)");
  }
  if (access(script.c_str(), R_OK) != 0) {
    return Status::NotFound("the launcher script " + script + " is missing (it is launch/mpirun.sh of the source tree)");
  }
  const LaunchConfig& l = config.launch();
  std::vector<std::string> a = {"bash", script, "-n", std::to_string(l.workers())};
  if (l.launcher() == LaunchConfig::MPIRUN && !l.hostfile().empty()) {
    if (access(l.hostfile().c_str(), R_OK) != 0) {
      return Status::NotFound("launch.hostfile: " + l.hostfile() + " does not exist or is not readable");
    }
    a.insert(a.end(), {"--hostfile", l.hostfile()});
  }
  if (l.oversubscribe()) a.push_back("--oversubscribe");
  if (config.parallelism().mode_case() == ParallelismConfig::kAsync) {
    // The shards: the first program of an MPMD line (paramserver/mpmd.h).
    const std::string ps = request.ps_binary.empty() ? SelfDir() + "/dtrain-ps" : request.ps_binary;
    if (access(ps.c_str(), X_OK) != 0) {
      return Status::NotFound("the parameter-server program " + ps + " is missing or not executable (build dtrain-ps)");
    }
    a.insert(a.end(), {"--ps", std::to_string(config.parallelism().async().shards()), "--ps-program", ps});
  }
  for (const std::string& m : l.mpirun_args()) a.insert(a.end(), {"--mpi-arg", m});
  a.insert(a.end(), {"--", worker, "--config", request.config_path});
  for (const std::string& o : request.overrides) a.insert(a.end(), {"--set", o});
  if (request.no_progress) a.push_back("--no-progress");
  if (request.resume) a.push_back("--resume");
  if (request.force) a.push_back("--force");
  *argv = std::move(a);
  return Status::OK();
}

Status RunAndWait(const std::vector<std::string>& argv) {
  std::string line;
  for (const std::string& s : argv) line += (line.empty() ? "" : " ") + Quote(s);
  spdlog::info("launching: {}", line);
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = fork();
  if (pid < 0) return Status::Internal(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    // mpirun relays the ranks' output through pipes: let rank 0 draw its
    // progress bar when this process writes to a terminal.
    if (isatty(STDERR_FILENO) == 1 && env::Get(env::kProgress, nullptr) == nullptr) setenv(env::kProgress, "tty", 1);
    std::vector<char*> args;
    for (const std::string& s : argv) args.push_back(const_cast<char*>(s.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    std::fprintf(stderr, "dtrain: cannot run %s: %s\n", args[0], std::strerror(errno));
    _exit(127);
  }
  g_child = pid;
  struct sigaction sa {}, old_int {}, old_term {};
  sa.sa_handler = ForwardSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);
  int wstatus = 0;
  pid_t r;
  do {
    r = waitpid(pid, &wstatus, 0);
  } while (r < 0 && errno == EINTR);
  sigaction(SIGINT, &old_int, nullptr);
  sigaction(SIGTERM, &old_term, nullptr);
  g_child = 0;
  if (r < 0) return Status::Internal(std::string("waitpid: ") + std::strerror(errno));
  if (WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0) return Status::OK();
  if (WIFSIGNALED(wstatus)) {
    return Status::Aborted("the workers' launcher was killed by signal " + std::to_string(WTERMSIG(wstatus)));
  }
  return Status::Aborted("the workers failed (mpirun exit status " + std::to_string(WEXITSTATUS(wstatus)) +
                         "); their messages are above");
}

}  // namespace dtrain::coordinator
