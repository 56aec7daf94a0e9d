// The MPIRUN launcher: runs the workers of a job under mpirun, through
// launch/mpirun.sh (which adds the flags containers and small machines need).
// The coordinator (coordinator.h) uses it for every job of more than one
// worker: launch.launcher LOCAL runs the ranks on this machine, MPIRUN on the
// hosts of launch.hostfile. Open MPI wires a world of several ranks only
// under its own launcher.
#pragma once

#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/job.pb.h"

namespace dtrain::coordinator {

struct MpirunRequest {
  // How the workers load the job: the same config file and overrides the
  // user gave `dtrain run`, so that every rank resolves the same config.
  std::string config_path;
  std::vector<std::string> overrides;
  // Passed on to dtrain-worker.
  bool no_progress = false;
  bool resume = false;
  bool force = false;
  // Programs. Defaults: dtrain-worker beside this executable, and
  // launch/mpirun.sh of the source tree this binary was built from.
  std::string worker_binary;
  // parallelism.async: dtrain-ps beside this executable by default.
  std::string ps_binary;
  std::string mpirun_script;
};

// The argv that runs the job: bash mpirun.sh -n N [--hostfile H]
// [--oversubscribe] [--mpi-arg A]... [--ps S --ps-program dtrain-ps]
// -- dtrain-worker --config ... (async jobs: S shards first, an MPMD line).
// InvalidArgument / NotFound when a program or the hostfile is missing.
Status BuildMpirunCommand(const JobConfig& config, const MpirunRequest& request, std::vector<std::string>* argv);

// The directory of this program (where dtrain-worker and dtrain-ps are built
// beside it); "." when /proc/self/exe cannot be read.
std::string ProgramDir();

// `argv` as one shell-quoted line, for logs.
std::string CommandLine(const std::vector<std::string>& argv);

}  // namespace dtrain::coordinator
