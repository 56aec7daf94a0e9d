// Logging for every dtrain process, on spdlog (Debian's libspdlog).
//
// InitLogging() installs the default spdlog logger once per process: colour
// on a TTY, a "[role rank]" tag so the lines of many ranks can be told apart,
// and optionally a file under <run dir>/logs/. Code logs with spdlog's free
// functions (spdlog::info(...)) after that.
//
// Thread-safety: InitLogging must be called before other threads log; the
// logger it installs is thread-safe.
#pragma once

#include <string>

#include "dtrain/common/status.h"

namespace dtrain {

struct LoggingOptions {
  // Process role shown in every line: "dtrain", "worker", "ps", ...
  std::string role = "dtrain";
  // Rank shown after the role; -1 shows none.
  int rank = -1;
  // "trace", "debug", "info", "warn", "error", "off". Default: info, or the
  // value of DTRAIN_LOG_LEVEL (see common/env.h) when set.
  std::string level;
  // Also append to this file (directories are created). Empty: console only.
  std::string file;
};

Status InitLogging(const LoggingOptions& options);

}  // namespace dtrain
