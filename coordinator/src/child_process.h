// A process the coordinator starts (private to the coordinator library).
//
// The child runs in its own process group (so that stopping it reaches
// everything it started, e.g. mpirun's local ranks), with stdin from
// /dev/null, and gets SIGTERM when the thread that started it dies
// (PR_SET_PDEATHSIG), so a coordinator that is killed leaves no orphans.
// Its stdout and stderr go through a pipe to a reader thread that appends
// every line to `log_path` and hands it to `echo` (dtrain run's terminal).
//
// Thread-safety: Poll, Signal and Kill from one thread; `echo` is called from
// the reader thread.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "dtrain/common/status.h"

namespace dtrain::coordinator {

struct ChildSpec {
  std::vector<std::string> argv;
  // Added to (or replacing in) this process's environment.
  std::vector<std::pair<std::string, std::string>> env;
  // Variables removed from the child's environment.
  std::vector<std::string> unset_env;
  std::string log_path;
  std::function<void(const std::string& line)> echo;
};

class ChildProcess {
 public:
  // Unavailable naming the program when it cannot be started.
  static Status Start(const ChildSpec& spec, std::unique_ptr<ChildProcess>* child);
  // Kills the group if it still runs, then waits for the reader.
  ~ChildProcess();

  pid_t pid() const { return pid_; }
  // True once the child has exited; *wstatus then holds waitpid's status.
  bool Poll(int* wstatus);
  bool exited() const { return exited_; }
  // Sends `sig` to the child's process group.
  void Signal(int sig);
  // SIGTERM to the group, then SIGKILL after `grace_s` if the child still
  // runs; waits for it.
  void Stop(double grace_s);

  // "exited with status 3", "was killed by signal 9".
  static std::string DescribeExit(int wstatus);

 private:
  ChildProcess() = default;
  void ReadOutput(int fd);

  pid_t pid_ = -1;
  bool exited_ = false;
  int wstatus_ = 0;
  ChildSpec spec_;
  std::thread reader_;
  std::atomic<bool> stop_reader_{false};
};

// True when a process with this pid exists (kill(pid, 0)).
bool ProcessAlive(pid_t pid);

}  // namespace dtrain::coordinator
