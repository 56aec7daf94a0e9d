// dtrain: the user's command line.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "dtrain/common/logging.h"
#include "dtrain/coordinator/cli.h"

int main(int argc, char** argv) {
  CLI::App app{
      "dtrain: distributed training of image-retrieval models (embedders and a detector)\n"
      "on CPU or GPU workers, synchronous, asynchronous or pipelined.",
      "dtrain"};
  app.require_subcommand(1);
  app.fallthrough();

  if (dtrain::Status st = dtrain::InitLogging({}); !st.ok()) {
    std::fprintf(stderr, "dtrain: %s\n", st.ToString().c_str());
    return 2;
  }
  // Option callbacks run before subcommand callbacks, so the level is set
  // before any command logs.
  app.add_option_function<std::string>(
      "--log-level",
      [](const std::string& level) {
        dtrain::LoggingOptions lo;
        lo.level = level;
        dtrain::Status st = dtrain::InitLogging(lo);
        if (!st.ok()) throw CLI::ValidationError("--log-level", st.message());
      },
      "trace, debug, info, warn, error or off (default: info, or $DTRAIN_LOG_LEVEL)");

  int exit_code = 0;
  dtrain::cli::AddRunCommands(app, &exit_code);
  dtrain::cli::AddJobCommands(app, &exit_code);
  dtrain::cli::AddCkptCommands(app, &exit_code);
  dtrain::cli::AddIndexCommands(app, &exit_code);
  dtrain::cli::AddSnapCommands(app, &exit_code);
  dtrain::cli::AddStatusCommand(app, &exit_code);
  dtrain::cli::AddConfigCommands(app, &exit_code);
  dtrain::cli::AddDataCommands(app, &exit_code);
  dtrain::cli::AddVersionCommand(app, &exit_code);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return exit_code;
}
