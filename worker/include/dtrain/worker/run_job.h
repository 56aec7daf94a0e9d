// Running one worker's share of a job: picks the strategy the config asks for,
// trains, evaluates, and prints the evaluation table (chief).
#pragma once

#include "dtrain/common/status.h"
#include "dtrain/job.pb.h"
#include "dtrain/worker/trainer.h"

namespace dtrain::worker {

// `config` is validated with defaults filled (common/config.h). Today one local
// worker trains; sync, async and pipeline strategies plug in here.
// FailedPrecondition, naming the field, for a mode this build cannot run yet.
Status RunJob(const JobConfig& config, const TrainerOptions& options, TrainResult* result);

}  // namespace dtrain::worker
