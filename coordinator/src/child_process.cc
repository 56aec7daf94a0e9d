#include "child_process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>

extern char** environ;

namespace dtrain::coordinator {

bool ProcessAlive(pid_t pid) { return pid > 0 && (kill(pid, 0) == 0 || errno == EPERM); }

std::string ChildProcess::DescribeExit(int wstatus) {
  if (WIFEXITED(wstatus)) return "exited with status " + std::to_string(WEXITSTATUS(wstatus));
  if (WIFSIGNALED(wstatus)) {
    return "was killed by signal " + std::to_string(WTERMSIG(wstatus)) + " (" + strsignal(WTERMSIG(wstatus)) + ")";
  }
  return "ended (wait status " + std::to_string(wstatus) + ")";
}

Status ChildProcess::Start(const ChildSpec& spec, std::unique_ptr<ChildProcess>* child) {
  if (spec.argv.empty()) return Status::InvalidArgument("no program to start");
  // Everything the child needs is prepared before fork: after it, in a
  // process with other threads, only async-signal-safe calls are allowed.
  std::map<std::string, std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const char* eq = std::strchr(*e, '=');
    if (eq != nullptr) env[std::string(*e, static_cast<size_t>(eq - *e))] = eq + 1;
  }
  for (const std::string& name : spec.unset_env) env.erase(name);
  for (const auto& [k, v] : spec.env) env[k] = v;
  std::vector<std::string> env_strings;
  for (const auto& [k, v] : env) env_strings.push_back(k + "=" + v);
  std::vector<char*> envp, argv;
  for (std::string& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> args = spec.argv;
  for (std::string& s : args) argv.push_back(s.data());
  argv.push_back(nullptr);

  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return Status::Internal(std::string("pipe: ") + std::strerror(errno));
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) {
    close(fds[0]);
    close(fds[1]);
    return Status::Internal(std::string("fork: ") + std::strerror(errno));
  }
  if (pid == 0) {
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(127);  // the parent died before prctl
    const int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, STDIN_FILENO);
    dup2(fds[1], STDOUT_FILENO);
    dup2(fds[1], STDERR_FILENO);
    // Signals the coordinator handles must not stay ignored or blocked.
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGPIPE, SIG_DFL);
    execvpe(argv[0], argv.data(), envp.data());
    const char* msg = "dtrain coordinator: cannot execute the program\n";
    (void)!write(STDERR_FILENO, msg, std::strlen(msg));
    _exit(127);
  }
  setpgid(pid, pid);  // also here: no race with a Signal right after Start
  close(fds[1]);
  std::unique_ptr<ChildProcess> c(new ChildProcess());
  c->pid_ = pid;
  c->spec_ = spec;
  if (!spec.log_path.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(std::filesystem::path(spec.log_path).parent_path(), ec);
  }
  ChildProcess* raw = c.get();
  const int read_fd = fds[0];
  c->reader_ = std::thread([raw, read_fd] { raw->ReadOutput(read_fd); });
  *child = std::move(c);
  return Status::OK();
}

void ChildProcess::ReadOutput(int fd) {
  FILE* log = spec_.log_path.empty() ? nullptr : std::fopen(spec_.log_path.c_str(), "a");
  std::string pending;
  char buf[8192];
  auto emit = [&](const std::string& line) {
    if (log != nullptr) {
      std::fwrite(line.data(), 1, line.size(), log);
      std::fputc('\n', log);
      std::fflush(log);
    }
    if (spec_.echo) spec_.echo(line);
  };
  while (true) {
    pollfd p{fd, POLLIN, 0};
    const int r = poll(&p, 1, 200);
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) {
      // Quiet: stop once asked to (a grandchild that outlived the child may
      // hold the pipe open forever).
      if (stop_reader_) break;
      continue;
    }
    const ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    pending.append(buf, static_cast<size_t>(n));
    size_t start = 0, nl;
    while ((nl = pending.find('\n', start)) != std::string::npos) {
      std::string line = pending.substr(start, nl - start);
      // Progress bars redraw with \r: keep the last state of the line.
      const size_t cr = line.rfind('\r', line.size() > 0 ? line.size() - 1 : 0);
      if (cr != std::string::npos && cr + 1 < line.size()) line = line.substr(cr + 1);
      emit(line);
      start = nl + 1;
    }
    pending.erase(0, start);
  }
  if (!pending.empty()) emit(pending);
  if (log != nullptr) std::fclose(log);
  close(fd);
}

bool ChildProcess::Poll(int* wstatus) {
  if (exited_) {
    if (wstatus) *wstatus = wstatus_;
    return true;
  }
  int ws = 0;
  const pid_t r = waitpid(pid_, &ws, WNOHANG);
  if (r == pid_) {
    exited_ = true;
    wstatus_ = ws;
    if (wstatus) *wstatus = ws;
    return true;
  }
  return false;
}

void ChildProcess::Signal(int sig) {
  if (pid_ > 0) kill(-pid_, sig);
}

void ChildProcess::Stop(double grace_s) {
  if (pid_ <= 0) return;
  if (!Poll(nullptr)) {
    Signal(SIGCONT);  // a stopped (SIGSTOP) group cannot act on SIGTERM
    Signal(SIGTERM);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(grace_s);
    while (!Poll(nullptr) && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  // Whatever is left of the group (ranks that ignored the TERM) goes too.
  Signal(SIGKILL);
  if (!exited_) {
    int ws = 0;
    while (waitpid(pid_, &ws, 0) < 0 && errno == EINTR) {
    }
    exited_ = true;
    wstatus_ = ws;
  }
}

ChildProcess::~ChildProcess() {
  if (pid_ > 0 && !exited_) Stop(2.0);
  stop_reader_ = true;
  if (reader_.joinable()) reader_.join();
}

}  // namespace dtrain::coordinator
