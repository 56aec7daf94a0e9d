// The coordinator's completion step: hand the finished model to the index
// builder.
//
// When a job completes and index.build_at_end is set, the coordinator (the
// one embedded in `dtrain run`, or dtrain-coordinator) calls
// IndexBuilder.Build with the run directory (its model.pt carries the model
// config) and the job's index section. index.builder_address picks the
// builder: empty builds in-process, HOST:PORT asks that dtrain-indexer
// (with the job token from DTRAIN_JOB_TOKEN). The run directory then holds
// index/ (or index.output_dir), which `dtrain status` shows.
#pragma once

#include "dtrain/common/status.h"
#include "dtrain/coordinator/coordinator.h"
#include "dtrain/indexer/index_builder.h"
#include "dtrain/job.pb.h"

namespace dtrain::coordinator {

// The Build request for a completed job (paths made absolute, for a service
// that runs elsewhere).
BuildIndexRequest HandoffRequest(const JobConfig& config);

// Runs the hand-off through `builder`; logs what it built.
Status HandOffToIndexer(const JobConfig& config, indexer::IndexBuilder& builder, IndexManifest* manifest);

// The builder index.builder_address asks for (see above).
Status MakeIndexBuilder(const JobConfig& config, bool progress, std::unique_ptr<indexer::IndexBuilder>* out);

// The coordinator's hand-off step (coordinator.h, step 6): builds the index
// when index.build_at_end is set (nothing otherwise), prints
// "index: <summary>" and returns the summary.
HandOffFn IndexHandOff(bool progress);

}  // namespace dtrain::coordinator
