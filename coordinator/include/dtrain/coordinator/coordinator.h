// The job coordinator: launches a job's processes, knows their state through
// registrations and heartbeats, recovers from failures and hands the finished
// model on. `dtrain run` embeds one (in-process, for one job);
// `dtrain-coordinator` is the same class as a long-running service that
// `dtrain submit|status|stop|logs --coordinator HOST:PORT` talk to.
//
// Launchers (chosen per job):
//   LOCAL   launch.workers == 1: fork/exec dtrain-worker (and, for an async
//           job, each dtrain-ps shard first, standalone, its address passed
//           on in DTRAIN_PS_ADDRESSES).
//   MPIRUN  launch.workers > 1 or launch.launcher MPIRUN: the mpirun command
//           of launch/mpirun.sh (hostfile, MPMD line with the shards for
//           async). Open MPI wires a world of several ranks only under its
//           own launcher, so a multi-worker job always goes through it.
// Every process gets DTRAIN_COORDINATOR, DTRAIN_JOB_ID, DTRAIN_JOB_TOKEN
// (coordinator/membership.h) and, under mpirun, DTRAIN_LOG_DIR; the
// launcher's output is kept in <run dir>/logs/.
//
// The job protocol (one supervisor thread per job; every state change is
// written to the job table before it is acted on):
//   1. Submit: the config is resolved and validated (a bad one is refused
//      with file:line and field, nothing is recorded); the job gets an id,
//      a token and the state PENDING.
//   2. Launch: attempt += 1, state LAUNCHING; the processes start. A
//      restarted attempt (and a resumed job) passes --resume, so training
//      continues from the newest good checkpoint of the run's store.
//   3. Every expected process (launch.workers workers, plus the shards of an
//      async job) registers: state RUNNING. While the chief reports the
//      phase "checkpointing" the state is CHECKPOINTING.
//   4. Watching, every poll interval:
//      a. a process (or the launcher) that exits non-zero, one that says
//         goodbye with a failure, one silent for launch.heartbeat_timeout_s
//         and one not registered within max(3 x heartbeat timeout, 60 s) of
//         the launch are failures;
//      b. no progress (the furthest step unchanged) for
//         launch.stall_timeout_s marks the job stalled, naming the ranks
//         behind; progress clears the mark (a report, not a failure).
//   5. On a failure every remaining process of the attempt is stopped
//      (SIGTERM to the launcher's process group, SIGKILL after a grace
//      period, and SIGKILL to every registered pid on this host), so no
//      orphan is left. A failure a restart cannot mend (a process's goodbye
//      with InvalidArgument, NotFound or FailedPrecondition: a bad config,
//      a missing dataset) fails the job at once; otherwise, while restarts
//      < launch.max_restarts, state RESTARTING, a back-off of
//      restart_backoff_s x 2^(restarts) (at most 60 s), restarts += 1, and
//      step 2. Out of restarts: FAILED, with the last reason.
//   6. Completion (the launcher, or every worker, exits 0): the hand-off
//      (the finished model to the index builder when index.build_at_end),
//      then COMPLETED; a failed hand-off fails the job (the model stays in
//      the run directory).
//   7. Stop: every process of the job is stopped as in 5; state STOPPED.
//   8. A coordinator that starts on an existing state directory first ends
//      whatever a dead predecessor left of its jobs' process groups, then
//      relaunches every job that was not in a final state, resuming from
//      its newest checkpoint (not counted as a restart).
//
// Thread-safety: every public method may be called from any thread.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/coordinator.pb.h"
#include "dtrain/job.pb.h"

namespace dtrain::coordinator {

// What happens to a finished model (step 6). Returns a one-line summary for
// the job record ("HNSW index of 60000 images in runs/x/index").
using HandOffFn = std::function<Status(const JobConfig& config, std::string* summary)>;

struct CoordinatorOptions {
  // The job table's RocksDB directory (created).
  std::string state_dir;
  // Where the service listens. Default: 127.0.0.1, a free port.
  std::string bind_address = "127.0.0.1";
  int port = 0;
  // Users' token (Submit, ListJobs, StopJob, ReadLog). Required.
  std::string token;
  // dtrain-worker and dtrain-ps. Default: the directory of this program.
  std::string bin_dir;
  // launch/mpirun.sh. Default: the one of the source tree dtrain was built from.
  std::string mpirun_script;
  // Every line the processes write, as it comes (dtrain run's terminal).
  std::function<void(const std::string& job_id, const std::string& line)> echo;
  // Events (launch, failure, restart, completion). Default: logged with
  // spdlog ("job ID: EVENT").
  std::function<void(const std::string& job_id, const std::string& event)> on_event;
  HandOffFn hand_off;
  // Relaunch the unfinished jobs found in state_dir (step 8). Default: true.
  // When false (dtrain run), they are marked STOPPED instead.
  bool recover = true;
  // Seconds between the supervisor's checks. Default: 0.2.
  double poll_interval_s = 0.2;
  // Seconds between SIGTERM and SIGKILL when stopping processes. Default: 5.
  double stop_grace_s = 5;
};

class CoordinatorService;

class Coordinator {
 public:
  // Opens the job table, starts the service, recovers jobs (step 8).
  static Status Start(CoordinatorOptions options, std::unique_ptr<Coordinator>* coordinator);
  // Stops the service and every job's processes. Jobs that were running keep
  // their state, so the next coordinator on this state directory relaunches
  // them (step 8).
  ~Coordinator();

  // HOST:PORT the processes and clients reach the service at.
  std::string address() const;

  Status Submit(const SubmitRequest& request, SubmitReply* reply);
  // Every job (id empty) or one.
  Status Jobs(const std::string& id, std::vector<JobRecord>* jobs) const;
  // Step 7. The job's final state (a job already final keeps its state).
  Status Stop(const std::string& id, JobState* state);
  // Blocks until the job reaches a final state; its record then.
  Status Wait(const std::string& id, JobRecord* job);

 private:
  friend class CoordinatorService;
  struct Impl;
  explicit Coordinator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The whole job's figures from its processes' latest reports.
struct JobFigures {
  int64_t step = -1;  // the furthest worker's; -1 before any report
  int64_t total_steps = 0;
  double images_per_sec = 0;  // summed over the workers
  double loss = 0;            // the chief's (worker 0)
  bool has_loss = false;
  int alive = 0;     // registered and not exited
  int expected = 0;  // workers and shards
};
JobFigures Summarize(const JobRecord& job);

// The one-line state of a job for tables and logs:
// "running, step 120/400, 2/2 processes, 1843 img/s, loss 0.4210".
std::string DescribeJob(const JobRecord& job);

// A table of jobs and, with `processes`, every process of each job
// (role, rank, host, pid, step, images/s, last heartbeat, state).
std::string JobsTable(const std::vector<JobRecord>& jobs, bool processes, int64_t now_ms);

}  // namespace dtrain::coordinator
