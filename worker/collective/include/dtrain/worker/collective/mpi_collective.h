// The Open MPI backend of Collective, and the process's MPI runtime.
//
// Threading: MPI is initialised with MPI_THREAD_MULTIPLE. Callers only
// enqueue; each MpiCollective owns three threads (owners fed by queues):
//   - the collective thread runs the collectives one by one in issue order
//     with Open MPI's blocking calls (MPI_Allreduce, MPI_Bcast, MPI_Allgather,
//     MPI_Barrier), whose tuned algorithms are 1.5-10x faster here than the
//     non-blocking ones (docs/benchmarks.md); while it is inside MPI the
//     caller computes on (that is the overlap);
//   - the point-to-point thread starts MPI_Isend/MPI_Irecv at once (so a send
//     never waits behind a collective) and polls them with MPI_Test, spinning
//     for up to `spin_us` after the last progress, then sleeping in growing
//     steps up to `max_sleep_us`; a newly queued transfer ends a sleep at
//     once, and while a thread waits for one of its transfers (Work::Wait,
//     so that thread's core is idle) it polls without sleeping;
//   - the watchdog thread sleeps until the running collective's announce time
//     or deadline (the stall inspector below).
//
// Stall inspector: when a collective has run for stall_fraction x its
// timeout, the watchdog tells every other rank (on a private communicator)
// that this rank is waiting in collective #n. At the deadline, the ranks that
// said so had arrived; the others had not, and the DeadlineExceeded error
// names them. The collective is then broken: the operation stays with MPI
// (its buffers are kept alive, the thread is left inside MPI), every later
// operation fails at once, and the process should end with Abort().
//
// Tensors: CPU tensors of float32/64, bfloat16, float16, int32/64, uint8.
// CUDA tensors are staged through host memory (a copy each way), which makes
// multi-rank GPU runs work on one GPU without NCCL; NCCL is the fast path.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "dtrain/common/status.h"
#include "dtrain/worker/collective/collective.h"

namespace dtrain::collective {

// The process's MPI runtime: Init once in main(), before any MpiCollective.
class MpiRuntime {
 public:
  // True when this process was started by mpirun/mpiexec (Open MPI's or a
  // PMI/PMIx launcher's environment variables are set).
  static bool LaunchedByMpirun();
  // MPI_Init_thread(SERIALIZED). Idempotent. Also works for a process that
  // was not started by mpirun (a singleton world of size 1).
  static Status Init();
  static bool initialized();
  // World rank and size (0 and 1 before Init).
  static int world_rank();
  static int world_size();
  // MPI_Finalize, once every MpiCollective is destroyed. Idempotent.
  static void Finalize();
  // MPI_Abort(MPI_COMM_WORLD, code) when initialised; std::_Exit otherwise.
  [[noreturn]] static void Abort(int exit_code);
};

struct MpiCollectiveOptions {
  // Deadline of every operation that sets none. Default: 300 s.
  std::chrono::milliseconds timeout{300000};
  // Announce "waiting" to the peers after this fraction of the timeout.
  // Default: 0.5.
  double stall_fraction = 0.5;
  // Point-to-point: busy-poll for this long after the last progress before
  // sleeping. Default: 1000 us.
  int spin_us = 1000;
  // Longest sleep between polls. Default: 200 us.
  int max_sleep_us = 200;
  // Point-to-point: poll without sleeping while a thread waits for one of
  // the transfers (its core is idle then). Default: on, except where mpirun
  // was told that ranks share cores (mpi_yield_when_idle, which
  // launch/mpirun.sh sets for more ranks than cores): there the waiting
  // rank's core runs another rank.
  bool poll_while_waiting = true;
};

class MpiCollective : public Collective {
 public:
  // A Collective over all ranks of MPI_COMM_WORLD (duplicated, so its
  // traffic never mixes with other users of MPI). Collective over the world:
  // every rank must call it. Precondition: MpiRuntime::Init() succeeded.
  static Status Create(const MpiCollectiveOptions& options, std::unique_ptr<MpiCollective>* out);
  // The same over the ranks of the world that pass the same `color` (an
  // MPI_Comm_split; ranks ordered by world rank), e.g. the workers of an
  // MPMD job. Collective over the world.
  static Status CreateSplit(const MpiCollectiveOptions& options, int color, std::unique_ptr<MpiCollective>* out);
  ~MpiCollective() override;

  int rank() const override;
  int size() const override;
  const char* backend() const override { return "mpi"; }

  std::shared_ptr<Work> AllReduce(at::Tensor tensor, ReduceOp op, OpOptions options = {}) override;
  std::shared_ptr<Work> Broadcast(at::Tensor tensor, int root, OpOptions options = {}) override;
  std::shared_ptr<Work> AllGather(at::Tensor output, at::Tensor input, OpOptions options = {}) override;
  std::shared_ptr<Work> Barrier(OpOptions options = {}) override;
  std::shared_ptr<Work> Send(at::Tensor tensor, int dst, int tag, OpOptions options = {}) override;
  std::shared_ptr<Work> Recv(at::Tensor tensor, int src, int tag, OpOptions options = {}) override;
  [[noreturn]] void Abort(int exit_code) override;

  // Bytes handed to MPI so far (after compression), for benchmarks.
  int64_t bytes_sent() const;

  struct Impl;

 private:
  explicit MpiCollective(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dtrain::collective
