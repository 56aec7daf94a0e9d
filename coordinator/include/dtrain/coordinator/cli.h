// Subcommands of the `dtrain` command line. Each Add* function registers its
// subcommand(s) on `app`; the callback stores the command's exit status in
// `*exit_code` (0 only on success) and prints errors to stderr.
#pragma once

#include <CLI/CLI.hpp>

namespace dtrain::cli {

// dtrain config check|print CONFIG [--set k=v]...
void AddConfigCommands(CLI::App& app, int* exit_code);

// dtrain data summary [--dir DIR] [--split train|test|all] [--limit N]
void AddDataCommands(CLI::App& app, int* exit_code);

// dtrain run CONFIG [--set k=v]... [--run-dir DIR]; dtrain eval RUN_DIR
void AddRunCommands(CLI::App& app, int* exit_code);

// dtrain submit CONFIG | stop JOB | logs JOB --coordinator HOST:PORT
// (dtrain-coordinator's users), logs RUN_DIR.
void AddJobCommands(CLI::App& app, int* exit_code);

// dtrain ckpt list|inspect|export PATH
void AddCkptCommands(CLI::App& app, int* exit_code);

// dtrain index build|query|eval|info
void AddIndexCommands(CLI::App& app, int* exit_code);

// dtrain snap index build|info, dtrain snap query: the snap index
// (indexer/snap_index.h).
void AddSnapCommands(CLI::App& app, int* exit_code);

// dtrain status [RUN_DIR]...: what each run directory holds (jobs and their
// processes, checkpoints, evaluation, index); with --coordinator, every job
// of a dtrain-coordinator and its processes.
void AddStatusCommand(CLI::App& app, int* exit_code);

// dtrain version: dtrain's version and every library it was built with.
void AddVersionCommand(CLI::App& app, int* exit_code);

}  // namespace dtrain::cli
