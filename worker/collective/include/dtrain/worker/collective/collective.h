// Collective: the communication primitives of every multi-worker mode.
//
// One interface, one file pair per backend:
//   mpi_collective.h   Open MPI, CPU tensors (and CUDA tensors staged through
//                      host memory); also bootstraps NCCL
//   nccl_collective.h  NCCL, CUDA tensors
//
// Ordering contract (as in c10d's ProcessGroup): every rank of a Collective
// must issue the same collectives (AllReduce, Broadcast, AllGather, Barrier)
// in the same order, with tensors of the same size and dtype. Operations are
// started in the order they are issued and may run concurrently with the
// caller (and with each other); Send/Recv are point-to-point and are matched
// by (peer, tag) in issue order, independently of the collectives.
//
// Asynchrony: every operation returns a Work handle at once. The tensor
// arguments must stay alive and untouched until Wait() returns; for AllReduce
// and Broadcast the result is written into the tensor in place.
//
// Timeouts: every operation carries a deadline (OpOptions::timeout, default
// CollectiveOptions::timeout). An operation that does not complete in time
// fails with DeadlineExceeded and a message naming the operation, its label
// (e.g. "grad bucket 2/5") and which ranks had not reached it (a stall
// inspector in the spirit of Horovod's). After a timeout the Collective is
// broken: every later operation fails at once, and the process should exit
// (Abort()) rather than try to continue, because the peers' state is unknown.
//
// Thread-safety: the methods may be called from any thread, but the ordering
// contract is about the order of calls, so a program normally issues
// collectives from one thread (the training thread); Work handles may be
// waited on from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/common/status.h"

namespace at {
class Tensor;
}

namespace dtrain::collective {

enum class ReduceOp {
  kSum,
  kAverage,  // sum divided by size()
  kMax,
};

// Wire dtype of a reduction. kFp16/kBf16 halve the bytes on the wire; the
// tensor itself keeps its dtype (converted before and after).
enum class WireType {
  kNative,
  kFp16,
  kBf16,
};

struct OpOptions {
  // Names the operation in errors and timing ("grad bucket 2/5"). Default: the
  // operation's kind.
  std::string label;
  // 0 = the Collective's default timeout.
  std::chrono::milliseconds timeout{0};
  // AllReduce only.
  WireType wire = WireType::kNative;
};

// A pending operation.
class Work {
 public:
  virtual ~Work() = default;
  // Blocks until the operation completes or fails (its deadline included).
  // Returns the same Status every time it is called.
  virtual Status Wait() = 0;
  // Non-blocking: true once Wait() would return without blocking.
  virtual bool IsCompleted() = 0;
  // Seconds from the operation's start to its completion (0 before).
  virtual double seconds() const = 0;
};

class Collective {
 public:
  virtual ~Collective() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // "mpi" or "nccl".
  virtual const char* backend() const = 0;

  // In place: `tensor` becomes the reduction over all ranks. Contiguous.
  virtual std::shared_ptr<Work> AllReduce(at::Tensor tensor, ReduceOp op, OpOptions options = {}) = 0;
  // In place: `tensor` becomes root's tensor on every rank.
  virtual std::shared_ptr<Work> Broadcast(at::Tensor tensor, int root, OpOptions options = {}) = 0;
  // output = concatenation of every rank's input along dimension 0, in rank
  // order. output must hold size() x input.numel() elements, same dtype.
  virtual std::shared_ptr<Work> AllGather(at::Tensor output, at::Tensor input, OpOptions options = {}) = 0;
  virtual std::shared_ptr<Work> Barrier(OpOptions options = {}) = 0;
  // Point-to-point: matched with the peer's Recv/Send of the same tag, in
  // issue order. Size and dtype must agree (the pipeline agrees on them first).
  virtual std::shared_ptr<Work> Send(at::Tensor tensor, int dst, int tag, OpOptions options = {}) = 0;
  virtual std::shared_ptr<Work> Recv(at::Tensor tensor, int src, int tag, OpOptions options = {}) = 0;

  // Ends every process of the job at once with `exit_code` (MPI_Abort), for
  // errors after which the peers cannot continue (a timeout, a failed step).
  [[noreturn]] virtual void Abort(int exit_code) = 0;
};

// Waits for every handle; returns the first error (all are waited on).
Status WaitAll(const std::vector<std::shared_ptr<Work>>& works);

const char* ReduceOpName(ReduceOp op);
const char* WireTypeName(WireType wire);

}  // namespace dtrain::collective
