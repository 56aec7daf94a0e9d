#include "dtrain/common/metrics_log.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

namespace dtrain {

namespace {
Status MakeParent(const std::string& path) {
  std::filesystem::path p(path);
  if (!p.has_parent_path()) return Status::OK();
  std::error_code ec;
  std::filesystem::create_directories(p.parent_path(), ec);
  if (ec) return Status::IOError("cannot create directory " + p.parent_path().string() + ": " + ec.message());
  return Status::OK();
}
}  // namespace

Status MetricsLog::Open(const std::string& path, std::unique_ptr<MetricsLog>* out) {
  DTRAIN_RETURN_IF_ERROR(MakeParent(path));
  std::FILE* f = std::fopen(path.c_str(), "a");
  if (f == nullptr) return Status::IOError("cannot open " + path + ": " + std::strerror(errno));
  out->reset(new MetricsLog(path, f));
  return Status::OK();
}

MetricsLog::~MetricsLog() {
  if (file_ != nullptr) std::fclose(file_);
}

Status MetricsLog::Append(const Record& record) {
  nlohmann::ordered_json j;
  for (const auto& [k, v] : record) {
    if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 9e15) {
      j[k] = static_cast<int64_t>(v);
    } else if (std::isfinite(v)) {
      j[k] = v;
    } else {
      j[k] = nullptr;  // JSON has no NaN/Inf
    }
  }
  const std::string line = j.dump() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), file_) != line.size() || std::fflush(file_) != 0) {
    return Status::IOError("cannot append to " + path_ + ": " + std::strerror(errno));
  }
  return Status::OK();
}

Status WriteFileAtomically(const std::string& path, const std::string& contents) {
  DTRAIN_RETURN_IF_ERROR(MakeParent(path));
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "w");
  if (f == nullptr) return Status::IOError("cannot write " + tmp + ": " + std::strerror(errno));
  const bool ok = std::fwrite(contents.data(), 1, contents.size(), f) == contents.size() && std::fflush(f) == 0;
  std::fclose(f);
  if (!ok) return Status::IOError("cannot write " + tmp + ": " + std::strerror(errno));
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return Status::IOError("cannot rename " + tmp + " to " + path + ": " + ec.message());
  return Status::OK();
}

}  // namespace dtrain
