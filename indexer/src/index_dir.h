// Internal to indexer/: writing an index directory so that a reader sees the
// previous index or the new one, never half of one. A build writes into a
// sibling directory (UniqueSibling), removed on failure (DirCleanup), and
// SwapIntoPlace renames it over the output.
#pragma once

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <string>
#include <system_error>

#include "dtrain/common/status.h"

namespace dtrain::indexer::internal {

// Removes a directory on scope exit unless released.
class DirCleanup {
 public:
  explicit DirCleanup(std::string dir) : dir_(std::move(dir)) {}
  ~DirCleanup() {
    if (dir_.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  DirCleanup(const DirCleanup&) = delete;
  DirCleanup& operator=(const DirCleanup&) = delete;
  void Release() { dir_.clear(); }

 private:
  std::string dir_;
};

// "<out><tag><pid>-<n>": a name beside `out` that no other build uses.
inline std::string UniqueSibling(const std::string& out, const char* tag) {
  static std::atomic<int> counter{0};
  return out + tag + std::to_string(::getpid()) + "-" + std::to_string(counter++);
}

// Renames `building` to `out`, moving an existing `out` aside first and
// removing it after; on failure the previous `what` (e.g. "index") is put
// back.
inline Status SwapIntoPlace(const std::string& building, const std::string& out, const std::string& what) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::string old;
  if (fs::exists(out, ec)) {
    old = UniqueSibling(out, ".old-");
    fs::rename(out, old, ec);
    if (ec) return Status::IOError("cannot move the previous " + what + " " + out + " aside: " + ec.message());
  }
  fs::rename(building, out, ec);
  if (ec) {
    std::error_code ec2;
    if (!old.empty()) fs::rename(old, out, ec2);
    return Status::IOError("cannot rename " + building + " to " + out + ": " + ec.message());
  }
  if (!old.empty()) fs::remove_all(old, ec);
  return Status::OK();
}

}  // namespace dtrain::indexer::internal
