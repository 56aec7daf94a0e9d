// An MPMD launch of an async job: one mpirun starts the shards and the
// workers in one MPI world,
//   mpirun -np S dtrain-ps --config JOB : -np N dtrain-worker --config JOB
// and the shards tell the workers where they listen. MPI is only the
// rendezvous here; parameters travel over gRPC.
//
// Protocol (every call is collective over MPI_COMM_WORLD, in this order):
//   1. Split the world by role: shards call ShardJoin(); workers build their
//      MpiCollective with MpiCollective::CreateSplit(kWorkerColor). Shard i is
//      the shard of rank i among the shards (world-rank order).
//   2. Every shard starts its server, then ShardPublish(its address): the
//      shards gather the addresses at shard 0, which broadcasts the list to
//      every rank of the world; workers take it with WorkerReceive().
//   3. At the end every rank calls JobDone(): a barrier that the shards wait
//      in while they serve (polling with sleeps, so an idle shard does not
//      spin a core); it completes when the last worker has finished.
// A rank that fails calls MPI_Abort (worker/run_job.h FinishProcess), which
// ends the whole world: no shard outlives its workers.
#pragma once

#include <string>
#include <vector>

#include "dtrain/common/status.h"

namespace dtrain::paramserver::mpmd {

inline constexpr int kShardColor = 0;
inline constexpr int kWorkerColor = 1;

// Shard side, step 1. MPI must be initialised (MPI_Init_thread).
Status ShardJoin(int* shard, int* num_shards);
// Shard side, step 2.
Status ShardPublish(const std::string& address);
// Worker side, step 2. FailedPrecondition, saying how to launch, when the
// world has no shard ranks.
Status WorkerReceive(std::vector<std::string>* addresses);
// Step 3, every rank; polls every `poll_ms` milliseconds.
Status JobDone(int poll_ms);

}  // namespace dtrain::paramserver::mpmd
