// The NCCL backend of Collective: CUDA tensors, one GPU per rank.
//
// Built when CMake finds NCCL and LibTorch has CUDA (DTRAIN_HAVE_NCCL); in
// other builds CreateNcclCollective() returns FailedPrecondition. Its test skips at run time
// without a GPU.
//
// Bootstrap: rank 0 makes the ncclUniqueId and broadcasts it over `bootstrap`
// (an MpiCollective over the same ranks), then every rank joins the NCCL
// communicator on device `device_index`.
//
// Streams: operations run on a dedicated CUDA stream that first waits for the
// caller's current stream (so the inputs are ready); Wait() makes the caller's
// current stream wait for the operation, so results are ordered before later
// kernels without blocking the host longer than needed. The host polls the
// operation's event and ncclCommGetAsyncError; past the deadline the
// communicator is aborted (ncclCommAbort) and the Collective is broken. NCCL
// cannot tell which ranks had not arrived; the timeout error says so and the
// other ranks' logs show where they were.
#pragma once

#include <chrono>
#include <memory>

#include "dtrain/common/status.h"
#include "dtrain/worker/collective/collective.h"

namespace dtrain::collective {

struct NcclCollectiveOptions {
  // CUDA device of this rank. Default: 0.
  int device_index = 0;
  // Deadline of every operation that sets none. Default: 300 s.
  std::chrono::milliseconds timeout{300000};
};

// True when this build has the NCCL backend (it may still find no GPU).
bool NcclAvailable();

// Collective over the ranks of `bootstrap`: every rank must call it.
Status CreateNcclCollective(Collective& bootstrap, const NcclCollectiveOptions& options,
                            std::unique_ptr<Collective>* out);

}  // namespace dtrain::collective
