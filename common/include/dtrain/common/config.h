// Job configuration: load, override, default, validate, write.
//
// A job is one dtrain.JobConfig (proto/dtrain/job.proto) written in protobuf
// text format. Loading is parsed once into that typed message; nothing else in
// dtrain reads config files or environment variables for job settings.
//
// Loading a config, step by step:
//   1. Parse the text format. A syntax error names file:line:column.
//   2. Apply each `--set a.b.c=value` override in order (typed by the schema;
//      a message field takes `{text format}`, a repeated one `[v1, v2]`).
//      Setting a field inside a oneof (parallelism.async.max_staleness=2)
//      selects that member, which is how a job switches modes.
//   3. Fill every unset field with its documented default, so the resolved
//      config spells out everything the job runs with.
//   4. Validate ranges and cross-field rules. Every problem is reported, each
//      as "<where>: <field path>: <what is wrong>", where <where> is the
//      file:line:column of the field, the --set that gave it, or the file
//      alone for a default.
//
// Thread-safety: all functions are reentrant; they share no state.
#pragma once

#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/job.pb.h"

namespace dtrain {

// Steps 1-4 on the file at `path`.
Status LoadJobConfig(const std::string& path, const std::vector<std::string>& overrides,
                     JobConfig* out);

// Steps 1-4 on text held in memory; `source_name` stands for the file in messages.
Status ParseJobConfig(const std::string& text, const std::string& source_name,
                      const std::vector<std::string>& overrides, JobConfig* out);

// Step 2 for one "a.b.c=value" assignment.
Status ApplyOverride(const std::string& assignment, JobConfig* config);

// Step 3. Idempotent.
void FillDefaults(JobConfig* config);

// Step 4 without source locations (for configs built in code).
Status ValidateJobConfig(const JobConfig& config);

// Text format of the config, as written to <run dir>/config.textproto.
std::string FormatJobConfig(const JobConfig& config);

// Writes FormatJobConfig(config) to `path` atomically (temporary file, rename),
// creating parent directories.
Status WriteResolvedConfig(const JobConfig& config, const std::string& path);

// A short name for the parallelism mode: "sync", "async" or "pipeline".
const char* ParallelismModeName(const JobConfig& config);

}  // namespace dtrain
