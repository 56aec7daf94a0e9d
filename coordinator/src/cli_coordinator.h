// What the `dtrain` commands share (private to the command line): running a
// command's body as its callback, and talking to a dtrain-coordinator.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/coordinator/client.h"

namespace dtrain::cli {

// Runs fn() (returning Status) when `cmd` is chosen; a failure is printed as
// "<label>: <status>" on stderr and sets *exit_code to 1.
template <typename Fn>
void OnRun(CLI::App* cmd, const std::string& label, int* exit_code, Fn fn) {
  cmd->callback([label, exit_code, fn] {
    Status st = fn();
    if (!st.ok()) {
      std::fprintf(stderr, "%s: %s\n", label.c_str(), st.ToString().c_str());
      *exit_code = 1;
    }
  });
}

struct CoordinatorArgs {
  std::string address;
  std::string token_file;
};

// --coordinator HOST:PORT (or $DTRAIN_COORDINATOR) and --token-file.
void AddCoordinatorOptions(CLI::App* cmd, CoordinatorArgs* args, bool required);

// The Submit request for the config file at `path` with `overrides` (the
// coordinator resolves them again, naming `path` in errors).
Status MakeSubmitRequest(const std::string& path, const std::vector<std::string>& overrides, bool resume, bool force,
                         SubmitRequest* request);

// A client with the token of DTRAIN_JOB_TOKEN or --token-file.
Status ConnectCoordinator(const CoordinatorArgs& args, std::unique_ptr<coordinator::CoordinatorClient>* client);

}  // namespace dtrain::cli
