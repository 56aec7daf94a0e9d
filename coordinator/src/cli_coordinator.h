// What the `dtrain` commands that talk to a dtrain-coordinator share
// (private to the command line).
#pragma once

#include <CLI/CLI.hpp>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/coordinator/client.h"

namespace dtrain::cli {

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
