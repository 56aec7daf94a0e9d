// A job process's side of the coordinator protocol (coordinator.h): it
// registers with its role, rank, host and pid, heartbeats on a background
// thread with its latest progress, and says goodbye with its outcome.
//
// The coordinator's launchers give every process they start:
//   DTRAIN_COORDINATOR  the coordinator's HOST:PORT
//   DTRAIN_JOB_ID       the job's id
//   DTRAIN_JOB_TOKEN    the job's token (every call carries it)
// A process started by hand (mpirun without dtrain, a test) has no
// DTRAIN_COORDINATOR and runs without a coordinator.
//
// Heartbeats come from their own thread, so a process that is alive but slow
// (a long checkpoint, a big evaluation) keeps heartbeating; one that is
// stopped (SIGSTOP, a swapped-out machine) or dead does not. Progress that
// stops while heartbeats go on is the coordinator's "stalled" report.
//
// Thread-safety: SetProgress and SetPhase may be called from any thread.
#pragma once

#include <memory>
#include <string>

#include "dtrain/common/status.h"
#include "dtrain/coordinator.pb.h"

namespace dtrain::coordinator {

struct MembershipOptions {
  std::string address;  // HOST:PORT
  std::string job_id;
  std::string token;
  ProcessRole role = WORKER;
  int rank = 0;
  // Deadline of each call. Default: 5 s.
  double rpc_timeout_s = 5;
};

class MembershipClient {
 public:
  // Connects and registers when DTRAIN_COORDINATOR is set; leaves *client
  // null (and returns OK) when it is not. Unavailable, naming the address,
  // when the coordinator cannot be reached; Unauthenticated for a wrong token.
  static Status FromEnvironment(ProcessRole role, int rank, std::unique_ptr<MembershipClient>* client);
  // Registers, then heartbeats every interval the coordinator asks for.
  static Status Connect(const MembershipOptions& options, std::unique_ptr<MembershipClient>* client);
  // Stops the heartbeats (without a goodbye when Goodbye was not called: the
  // coordinator then sees the process by its exit status or silence).
  ~MembershipClient();

  // Sent with the next heartbeat.
  void SetProgress(const Progress& progress);
  void SetPhase(const std::string& phase);

  // Tells the coordinator how this process ends (sent once; stops the
  // heartbeats). A failure's code and message become the job's reason.
  void Goodbye(const Status& outcome);

 private:
  struct Impl;
  explicit MembershipClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dtrain::coordinator
