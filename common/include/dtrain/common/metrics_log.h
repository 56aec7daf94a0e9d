// metrics.jsonl: one JSON object per logged training step, appended to
// <run dir>/metrics.jsonl so that plots and dashboards can follow a job.
//
// Fields written by the trainer: step, epoch, loss, lr, images_per_sec and the
// phase times (data_ms, compute_ms, comm_ms, step_ms), plus whatever the
// strategy adds. Values are numbers; keys are kept in insertion order.
//
// Thread-safety: not thread-safe; one writer per file (the chief rank).
#pragma once

#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "dtrain/common/status.h"

namespace dtrain {

class MetricsLog {
 public:
  using Record = std::vector<std::pair<std::string, double>>;

  // Opens `path` for appending (directories are created).
  static Status Open(const std::string& path, std::unique_ptr<MetricsLog>* out);
  ~MetricsLog();

  // Appends one line and flushes it (a crash loses at most the line being written).
  Status Append(const Record& record);

  const std::string& path() const { return path_; }

 private:
  MetricsLog(std::string path, std::FILE* f) : path_(std::move(path)), file_(f) {}
  std::string path_;
  std::FILE* file_;
};

// Writes `json_text` to `path` atomically (temporary file, then rename).
Status WriteFileAtomically(const std::string& path, const std::string& contents);

}  // namespace dtrain
