// The coordinator's job table: one JobRecord per job in the coordinator's own
// RocksDB (key "job/<id>"), so that a restarted coordinator knows its jobs.
// State changes are written with a synced WAL (they survive a crash of the
// machine); progress updates are not synced (a crash loses at most the last
// seconds of progress, which the next heartbeat brings back).
//
// Thread-safety: every method may be called from any thread.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/coordinator.pb.h"

namespace dtrain::coordinator {

class JobTable {
 public:
  // Opens (creating) the table in `dir`. IOError naming the directory when
  // RocksDB cannot open it, e.g. because another coordinator holds it.
  static Status Open(const std::string& dir, std::unique_ptr<JobTable>* table);
  // A read-only view (for `dtrain status RUN_DIR` beside a live coordinator).
  static Status OpenReadOnly(const std::string& dir, std::unique_ptr<JobTable>* table);
  ~JobTable();

  // `sync`: wait until the write is on disk.
  Status Put(const JobRecord& job, bool sync);
  Status Get(const std::string& id, JobRecord* job) const;
  // Every job, oldest first (by submission time, then id).
  Status List(std::vector<JobRecord>* jobs) const;
  // A fresh job number (1, 2, ...), persisted before it is returned.
  Status NextJobNumber(int64_t* number);

 private:
  struct Impl;
  explicit JobTable(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// "running", "completed", ... (lower case, for tables).
std::string StateName(JobState state);
// COMPLETED, FAILED, STOPPED.
bool IsFinal(JobState state);

}  // namespace dtrain::coordinator
