// Running one worker's share of a job: picks the strategy the config asks for,
// trains, evaluates, and prints the evaluation table (chief).
#pragma once

#include "dtrain/common/status.h"
#include "dtrain/job.pb.h"
#include "dtrain/worker/trainer.h"

namespace dtrain::worker {

// `config` is validated with defaults filled (common/config.h).
//
// parallelism.sync: when this process was started by mpirun (or another MPI
// launcher), MPI is initialised and the job trains with the SyncStrategy over
// all ranks of MPI_COMM_WORLD (the world size comes from MPI; a different
// launch.workers only gets a warning). Otherwise one local worker trains.
//
// parallelism.async: under mpirun this process is one worker rank of an MPMD
// world with dtrain-ps ranks (paramserver/mpmd.h): it learns the shards'
// addresses from them, trains with the AsyncStrategy, and at the end waits
// with the shards until every worker is done. Without mpirun one worker
// trains against the shards in DTRAIN_PS_ADDRESSES. The job token comes from
// DTRAIN_JOB_TOKEN.
//
// training.threads = 0 gives each rank cores / (ranks on its node) threads.
//
// FailedPrecondition, naming the field, for a mode this build cannot run yet
// (pipeline) or a backend it cannot use (NCCL: the trainer computes on the
// CPU until GPU placement lands).
//
// After a failure in a multi-rank job the caller must end every rank
// (FailJob below): the peers may be blocked in a collective.
Status RunJob(const JobConfig& config, const TrainerOptions& options, TrainResult* result);

// Ends the process after RunJob: on success, finalises MPI if it was
// initialised and returns 0; on failure prints `st` with `program` and returns
// 1, or, in a job of several MPI ranks, aborts all of them (MPI_Abort, exit
// code 1) so that none is left waiting in a collective.
int FinishProcess(const char* program, const Status& st);

}  // namespace dtrain::worker
