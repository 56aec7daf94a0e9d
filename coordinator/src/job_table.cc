#include "dtrain/coordinator/job_table.h"

#include <rocksdb/db.h>
#include <rocksdb/options.h>

#include <algorithm>
#include <filesystem>
#include <mutex>

namespace dtrain::coordinator {
namespace {

constexpr const char* kJobPrefix = "job/";
constexpr const char* kCounterKey = "meta/next_job_number";

Status FromRocks(const rocksdb::Status& st, const std::string& what) {
  if (st.ok()) return Status::OK();
  return Status::IOError(what + ": " + st.ToString());
}

}  // namespace

struct JobTable::Impl {
  std::unique_ptr<rocksdb::DB> db;
  std::string dir;
  std::mutex counter_mu;
};

JobTable::JobTable(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
JobTable::~JobTable() = default;

Status JobTable::Open(const std::string& dir, std::unique_ptr<JobTable>* table) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Status::IOError("cannot create the coordinator's state directory " + dir + ": " + ec.message());
  rocksdb::Options o;
  o.create_if_missing = true;
  o.keep_log_file_num = 2;
  rocksdb::DB* db = nullptr;
  const rocksdb::Status st = rocksdb::DB::Open(o, dir, &db);
  if (!st.ok()) {
    return Status::IOError("cannot open the coordinator's job table in " + dir + " (is another coordinator using it?): " +
                           st.ToString());
  }
  auto impl = std::make_unique<Impl>();
  impl->db.reset(db);
  impl->dir = dir;
  table->reset(new JobTable(std::move(impl)));
  return Status::OK();
}

Status JobTable::OpenReadOnly(const std::string& dir, std::unique_ptr<JobTable>* table) {
  if (!std::filesystem::exists(dir + "/CURRENT")) return Status::NotFound(dir + " holds no job table");
  rocksdb::Options o;
  rocksdb::DB* db = nullptr;
  DTRAIN_RETURN_IF_ERROR(FromRocks(rocksdb::DB::OpenForReadOnly(o, dir, &db), "opening the job table in " + dir));
  auto impl = std::make_unique<Impl>();
  impl->db.reset(db);
  impl->dir = dir;
  table->reset(new JobTable(std::move(impl)));
  return Status::OK();
}

Status JobTable::Put(const JobRecord& job, bool sync) {
  std::string value;
  if (!job.SerializeToString(&value)) return Status::Internal("cannot serialise job " + job.id());
  rocksdb::WriteOptions w;
  w.sync = sync;
  return FromRocks(impl_->db->Put(w, kJobPrefix + job.id(), value), "writing job " + job.id());
}

Status JobTable::Get(const std::string& id, JobRecord* job) const {
  std::string value;
  const rocksdb::Status st = impl_->db->Get(rocksdb::ReadOptions(), kJobPrefix + id, &value);
  if (st.IsNotFound()) return Status::NotFound("no job '" + id + "'");
  DTRAIN_RETURN_IF_ERROR(FromRocks(st, "reading job " + id));
  if (!job->ParseFromString(value)) return Status::Corruption("the record of job " + id + " is unreadable");
  return Status::OK();
}

Status JobTable::List(std::vector<JobRecord>* jobs) const {
  jobs->clear();
  std::unique_ptr<rocksdb::Iterator> it(impl_->db->NewIterator(rocksdb::ReadOptions()));
  const std::string prefix = kJobPrefix;
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    JobRecord r;
    if (!r.ParseFromArray(it->value().data(), static_cast<int>(it->value().size()))) {
      return Status::Corruption("the record " + it->key().ToString() + " of the job table is unreadable");
    }
    jobs->push_back(std::move(r));
  }
  DTRAIN_RETURN_IF_ERROR(FromRocks(it->status(), "listing jobs"));
  std::sort(jobs->begin(), jobs->end(), [](const JobRecord& a, const JobRecord& b) {
    return a.submitted_ms() != b.submitted_ms() ? a.submitted_ms() < b.submitted_ms() : a.id() < b.id();
  });
  return Status::OK();
}

Status JobTable::NextJobNumber(int64_t* number) {
  std::lock_guard<std::mutex> lock(impl_->counter_mu);
  std::string value;
  int64_t n = 1;
  const rocksdb::Status st = impl_->db->Get(rocksdb::ReadOptions(), kCounterKey, &value);
  if (st.ok()) {
    n = std::stoll(value) + 1;
  } else if (!st.IsNotFound()) {
    return FromRocks(st, "reading the job counter");
  }
  rocksdb::WriteOptions w;
  w.sync = true;
  DTRAIN_RETURN_IF_ERROR(FromRocks(impl_->db->Put(w, kCounterKey, std::to_string(n)), "writing the job counter"));
  *number = n;
  return Status::OK();
}

std::string StateName(JobState state) {
  switch (state) {
    case PENDING: return "pending";
    case LAUNCHING: return "launching";
    case RUNNING: return "running";
    case CHECKPOINTING: return "checkpointing";
    case RESTARTING: return "restarting";
    case COMPLETED: return "completed";
    case FAILED: return "failed";
    case STOPPED: return "stopped";
    default: return "unknown";
  }
}

bool IsFinal(JobState state) { return state == COMPLETED || state == FAILED || state == STOPPED; }

}  // namespace dtrain::coordinator
