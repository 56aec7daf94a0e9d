#include "dtrain/common/logging.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <vector>

#include "dtrain/common/env.h"

namespace dtrain {

namespace env {
const char* Get(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return (v != nullptr && *v != '\0') ? v : fallback;
}
}  // namespace env

Status InitLogging(const LoggingOptions& options) {
  std::string level_name = options.level.empty() ? env::Get(env::kLogLevel, "info") : options.level;
  spdlog::level::level_enum level = spdlog::level::from_str(level_name);
  if (level == spdlog::level::off && level_name != "off") {
    return Status::InvalidArgument("unknown log level '" + level_name +
                                   "' (known: trace, debug, info, warn, error, off)");
  }
  std::vector<spdlog::sink_ptr> sinks;
  sinks.push_back(std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
  if (!options.file.empty()) {
    std::error_code ec;
    std::filesystem::path p(options.file);
    if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path(), ec);
    try {
      sinks.push_back(std::make_shared<spdlog::sinks::basic_file_sink_mt>(options.file, /*truncate=*/false));
    } catch (const spdlog::spdlog_ex& e) {
      return Status::IOError("cannot open log file " + options.file + ": " + e.what());
    }
  }
  auto logger = std::make_shared<spdlog::logger>(options.role, sinks.begin(), sinks.end());
  std::string tag = options.role;
  if (options.rank >= 0) tag += " " + std::to_string(options.rank);
  logger->set_pattern("%Y-%m-%d %H:%M:%S.%e %^%L%$ [" + tag + "] %v");
  logger->set_level(level);
  logger->flush_on(spdlog::level::warn);
  spdlog::set_default_logger(logger);
  return Status::OK();
}

}  // namespace dtrain
