#include "dtrain/coordinator/mpirun_launcher.h"

#include <unistd.h>

#include <filesystem>

namespace dtrain::coordinator {
namespace {

std::string Quote(const std::string& s) {
  if (s.find_first_of(" \t'\"$\\") == std::string::npos) return s;
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

}  // namespace

Status BuildMpirunCommand(const JobConfig& config, const MpirunRequest& request, std::vector<std::string>* argv) {
  const std::string worker = request.worker_binary.empty() ? ProgramDir() + "/dtrain-worker" : request.worker_binary;
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
    const std::string ps = request.ps_binary.empty() ? ProgramDir() + "/dtrain-ps" : request.ps_binary;
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

std::string ProgramDir() {
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string(".") : exe.parent_path().string();
}

std::string CommandLine(const std::vector<std::string>& argv) {
  std::string line;
  for (const std::string& s : argv) line += (line.empty() ? "" : " ") + Quote(s);
  return line;
}

}  // namespace dtrain::coordinator
