#include "dtrain/common/checkpoint_store.h"

#include <rocksdb/convenience.h>
#include <rocksdb/db.h>
#include <rocksdb/filter_policy.h>
#include <rocksdb/flush_block_policy.h>
#include <rocksdb/options.h>
#include <rocksdb/slice.h>
#include <rocksdb/sst_file_writer.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <set>
#include <shared_mutex>
#include <utility>

#include "dtrain/checkpoint.pb.h"
#include "dtrain/common/crc32c.h"

namespace dtrain {
namespace {

namespace fs = std::filesystem;

// Version of the key layout and manifest written by this code. A reader
// refuses a store or checkpoint with a higher one.
constexpr uint32_t kFormatVersion = 1;
constexpr uint64_t kMaxChunkBytes = 1ull << 30;
// Tensor indexes and chunk numbers are written with 8 digits so that keys
// sort in the order SstFileWriter needs.
constexpr uint64_t kMaxIndex = 100000000;

constexpr char kCheckpointsCf[] = "checkpoints";
constexpr char kIdentityKey[] = "store/identity";
constexpr char kLatestKey[] = "latest";
constexpr char kCheckpointPrefix[] = "ckpt/";
constexpr size_t kStepDigits = 20;
// Table files being written by Save, before they are ingested.
constexpr char kIngestDir[] = "ingest";

// ---- keys ----------------------------------------------------------------------

std::string StepPrefix(int64_t step) {
  char buf[48];
  std::snprintf(buf, sizeof(buf), "ckpt/%020" PRId64 "/", step);
  return buf;
}
// First key after every key of `step`: '0' follows '/' in ASCII.
std::string StepEnd(int64_t step) {
  std::string k = StepPrefix(step);
  k.back() = '0';
  return k;
}
std::string ManifestKey(int64_t step) { return StepPrefix(step) + "manifest"; }
std::string SectionKey(int64_t step, const std::string& name) { return StepPrefix(step) + "s/" + name; }
std::string ChunkKey(const std::string& step_prefix, size_t tensor, uint64_t chunk) {
  char buf[48];
  std::snprintf(buf, sizeof(buf), "t/%08zu/%08" PRIu64, tensor, chunk);
  return step_prefix + buf;
}

// The step of a key under ckpt/, or false.
bool ParseStepKey(const rocksdb::Slice& key, int64_t* step) {
  const size_t p = sizeof(kCheckpointPrefix) - 1;
  if (key.size() < p + kStepDigits + 1 || std::memcmp(key.data(), kCheckpointPrefix, p) != 0 ||
      key[p + kStepDigits] != '/') {
    return false;
  }
  int64_t v = 0;
  for (size_t i = p; i < p + kStepDigits; ++i) {
    const char c = key[i];
    if (c < '0' || c > '9') return false;
    v = v * 10 + (c - '0');
  }
  *step = v;
  return true;
}

// ---- small helpers ---------------------------------------------------------------

std::string Hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string CkptPrefix(int64_t step) { return "checkpoint " + std::to_string(step) + ": "; }

// Bytes that `shape` of `dtype` occupies; false on a negative dimension or overflow.
bool ExpectedBytes(DType dtype, const std::vector<int64_t>& shape, uint64_t* bytes) {
  uint64_t n = DTypeSize(dtype);
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return false;
  }
  *bytes = n;
  return true;
}

Status FromRocks(const rocksdb::Status& s, const std::string& context) {
  if (s.ok()) return Status::OK();
  const std::string msg = context + ": " + s.ToString();
  if (s.IsNotFound()) return Status::NotFound(msg);
  if (s.IsCorruption()) return Status::Corruption(msg);
  if (s.IsIOError()) return Status::IOError(msg);
  if (s.IsInvalidArgument()) return Status::InvalidArgument(msg);
  return Status::Internal(msg);
}

int64_t NowUnixSeconds() { return static_cast<int64_t>(std::time(nullptr)); }

std::string EncodeManifest(const CheckpointManifest& m) {
  std::string body;
  m.SerializeToString(&body);
  const uint32_t crc = crc32c::Value(body);
  std::string out(4, '\0');
  for (int i = 0; i < 4; ++i) out[i] = static_cast<char>((crc >> (8 * i)) & 0xFF);
  return out + body;
}

Status DecodeManifest(int64_t step, const rocksdb::Slice& value, CheckpointManifest* m) {
  if (value.size() < 4) return Status::Corruption(CkptPrefix(step) + "manifest is truncated");
  uint32_t stored = 0;
  for (int i = 0; i < 4; ++i) stored |= static_cast<uint32_t>(static_cast<uint8_t>(value[i])) << (8 * i);
  const uint32_t computed = crc32c::Value(value.data() + 4, value.size() - 4);
  if (stored != computed) {
    return Status::Corruption(CkptPrefix(step) + "manifest fails its CRC32C check (stored " + Hex32(stored) +
                              ", computed " + Hex32(computed) + ")");
  }
  if (!m->ParseFromArray(value.data() + 4, static_cast<int>(value.size() - 4))) {
    return Status::Corruption(CkptPrefix(step) + "manifest does not parse");
  }
  if (m->format_version() > kFormatVersion) {
    return Status::FailedPrecondition(CkptPrefix(step) + "written in format version " +
                                      std::to_string(m->format_version()) + ", this dtrain reads up to " +
                                      std::to_string(kFormatVersion));
  }
  if (m->step() != step) {
    return Status::Corruption(CkptPrefix(step) + "manifest says step " + std::to_string(m->step()));
  }
  return Status::OK();
}

Status ValidateData(const CheckpointData& d) {
  const std::string where = CkptPrefix(d.step);
  if (d.step < 0) return Status::InvalidArgument(where + "step must be >= 0");
  if (d.job_name.empty()) return Status::InvalidArgument(where + "job_name is empty");
  if (d.world_size < 1) {
    return Status::InvalidArgument(where + "world_size must be >= 1, got " + std::to_string(d.world_size));
  }
  if (d.tensors.size() >= kMaxIndex) return Status::InvalidArgument(where + "too many tensors");
  std::set<std::string_view> names;
  for (size_t i = 0; i < d.tensors.size(); ++i) {
    const TensorRecord& t = d.tensors[i];
    if (t.name.empty()) return Status::InvalidArgument(where + "tensor #" + std::to_string(i) + " has no name");
    const std::string tn = "tensor '" + t.name + "'";
    if (!names.insert(t.name).second) return Status::InvalidArgument(where + tn + " appears twice");
    if (DTypeSize(t.dtype) == 0) {
      return Status::InvalidArgument(where + tn + " has an unknown dtype (" +
                                     std::to_string(static_cast<int>(t.dtype)) + ")");
    }
    uint64_t expected = 0;
    if (!ExpectedBytes(t.dtype, t.shape, &expected)) {
      return Status::InvalidArgument(where + tn + " has an invalid shape " + ShapeString(t.shape));
    }
    if (expected != t.bytes.size()) {
      return Status::InvalidArgument(where + tn + " (" + DTypeName(t.dtype) + ", shape " + ShapeString(t.shape) +
                                     ") has " + std::to_string(t.bytes.size()) +
                                     " bytes, but shape x element size = " + std::to_string(expected) + " bytes");
    }
  }
  for (const auto& [name, bytes] : d.sections) {
    if (name.empty()) return Status::InvalidArgument(where + "a section has an empty name");
  }
  return Status::OK();
}

// Whether `identity` may take checkpoints of (job, digest): same job, and the
// same digest where both have one.
bool Compatible(const StoreIdentity& identity, const std::string& job, const std::string& digest) {
  if (identity.job_name() != job) return false;
  return identity.config_digest().empty() || digest.empty() || identity.config_digest() == digest;
}

std::string Refusal(const std::string& path, const StoreIdentity& identity, const std::string& job,
                    const std::string& digest) {
  std::string s = "checkpoint store '" + path + "' belongs to job '" + identity.job_name() + "' (config digest '" +
                  identity.config_digest() + "'); this is job '" + job + "' (config digest '" + digest + "')";
  if (identity.job_name() == job) {
    s += ": the configuration changed in a way its checkpoints do not survive";
  } else {
    s += ": a store is only resumed by the job that created it";
  }
  return s + " (force to use it anyway)";
}

// Data blocks for checkpoint values: small values (sections, small tensors)
// share blocks of up to block_size bytes, and a value that would overflow the
// current block starts a new one. So every large chunk is a block of its own
// and reading a small value never reads a large chunk with it (RocksDB's
// default policy would add a 4 MiB chunk to a block holding a few bytes).
class ChunkFlushPolicy : public rocksdb::FlushBlockPolicy {
 public:
  explicit ChunkFlushPolicy(size_t block_size) : block_size_(block_size) {}
  // Called before each key is added; true flushes the block first.
  bool Update(const rocksdb::Slice& key, const rocksdb::Slice& value) override {
    const size_t n = key.size() + value.size();
    const bool flush = used_ > 0 && used_ + n > block_size_;
    used_ = (flush ? 0 : used_) + n;
    return flush;
  }

 private:
  const size_t block_size_;
  size_t used_ = 0;
};

class ChunkFlushPolicyFactory : public rocksdb::FlushBlockPolicyFactory {
 public:
  const char* Name() const override { return "DtrainChunkFlushPolicy"; }
  rocksdb::FlushBlockPolicy* NewFlushBlockPolicy(const rocksdb::BlockBasedTableOptions& table,
                                                 const rocksdb::BlockBuilder&) const override {
    return new ChunkFlushPolicy(table.block_size);
  }
};

rocksdb::Options MakeRocksOptions(WritePath path) {
  rocksdb::Options r;
  r.create_if_missing = true;  // existence is checked before Open
  r.create_missing_column_families = true;
  // Tensor bytes are close to random: compression would cost time for nothing.
  r.compression = rocksdb::kNoCompression;
  r.bottommost_compression = rocksdb::kNoCompression;
  r.max_background_jobs = 2;
  // Unlinking the table files GC dropped (128 MiB and more each) happens on a
  // RocksDB background thread, not in Save.
  r.avoid_unnecessary_blocking_io = true;
  // With kIngest only GC's deletions and the identity go through the memtable
  // (RocksDB also preallocates each log file to about this size).
  r.write_buffer_size = path == WritePath::kIngest ? 4ull << 20 : 64ull << 20;
  r.target_file_size_base = 256ull << 20;
  r.max_bytes_for_level_base = 1ull << 30;
  // After a crash, replay the log up to the first torn record: every batch
  // before it (each a whole checkpoint or GC step) survives.
  r.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
  rocksdb::BlockBasedTableOptions table;
  // Blocks of up to 64 KiB, every large chunk a block of its own (see
  // ChunkFlushPolicy). XXH3 block checksums: Debian's RocksDB is
  // built portable and computes its CRC32C in software, XXH3 is vectorised.
  table.block_size = 64 << 10;
  table.flush_block_policy_factory = std::make_shared<ChunkFlushPolicyFactory>();
  table.checksum = rocksdb::kXXH3;
  // Whole-key Bloom filters: a Get skips table files that do not hold its
  // key. Besides saving reads, this keeps a damaged block of one checkpoint
  // from failing reads of another: with few level-0 files and no other
  // levels RocksDB does not compare key ranges and searches every file.
  table.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));
  r.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
  r.info_log_level = rocksdb::InfoLogLevel::WARN_LEVEL;
  r.keep_log_file_num = 2;
  return r;
}

rocksdb::ReadOptions MakeReadOptions(const rocksdb::Snapshot* snapshot) {
  rocksdb::ReadOptions r;
  r.snapshot = snapshot;
  r.verify_checksums = true;
  r.fill_cache = false;  // a checkpoint is read once; keep it out of the block cache
  return r;
}

// Where Save puts the keys of one column family: a table file being written
// (kIngest) or the shared WriteBatch (kWriteBatch). Keys arrive in order.
class KeySink {
 public:
  virtual ~KeySink() = default;
  virtual rocksdb::Status Put(const rocksdb::Slice& key, const rocksdb::Slice& value) = 0;
  virtual rocksdb::Status DeleteRange(const rocksdb::Slice& begin, const rocksdb::Slice& end) = 0;
};

class BatchSink : public KeySink {
 public:
  BatchSink(rocksdb::WriteBatch* batch, rocksdb::ColumnFamilyHandle* cf) : batch_(batch), cf_(cf) {}
  rocksdb::Status Put(const rocksdb::Slice& key, const rocksdb::Slice& value) override {
    return batch_->Put(cf_, key, value);
  }
  rocksdb::Status DeleteRange(const rocksdb::Slice& begin, const rocksdb::Slice& end) override {
    return batch_->DeleteRange(cf_, begin, end);
  }

 private:
  rocksdb::WriteBatch* batch_;
  rocksdb::ColumnFamilyHandle* cf_;
};

// A table file under <store>/ingest/, removed again unless ingested (RocksDB
// then moves it into the database).
class TableSink : public KeySink {
 public:
  TableSink(const rocksdb::Options& options, rocksdb::ColumnFamilyHandle* cf, std::string path)
      // invalidate_page_cache: the bytes are written once and rarely read,
      // so they should not push the trainer's memory out of the page cache.
      : writer_(rocksdb::EnvOptions(), options, cf, /*invalidate_page_cache=*/true), path_(std::move(path)) {}
  ~TableSink() override {
    std::error_code ec;
    fs::remove(path_, ec);  // gone already after a successful ingestion
  }
  rocksdb::Status Open() { return writer_.Open(path_); }
  rocksdb::Status Put(const rocksdb::Slice& key, const rocksdb::Slice& value) override {
    return writer_.Put(key, value);
  }
  rocksdb::Status DeleteRange(const rocksdb::Slice& begin, const rocksdb::Slice& end) override {
    return writer_.DeleteRange(begin, end);
  }
  // Writes the index and footer and syncs the file.
  rocksdb::Status Finish() { return writer_.Finish(); }
  const std::string& path() const { return path_; }

 private:
  rocksdb::SstFileWriter writer_;
  std::string path_;
};

}  // namespace

// ---- DType ---------------------------------------------------------------------------

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat64:
      return 8;
    case DType::kFloat16:
      return 2;
    case DType::kBFloat16:
      return 2;
    case DType::kInt64:
      return 8;
    case DType::kInt32:
      return 4;
    case DType::kUInt8:
      return 1;
    case DType::kBool:
      return 1;
  }
  return 0;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat64:
      return "float64";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kInt64:
      return "int64";
    case DType::kInt32:
      return "int32";
    case DType::kUInt8:
      return "uint8";
    case DType::kBool:
      return "bool";
  }
  return "unknown";
}

bool ParseDType(std::string_view name, DType* out) {
  for (int v = static_cast<int>(DType::kFloat32); v <= static_cast<int>(DType::kBool); ++v) {
    if (name == DTypeName(static_cast<DType>(v))) {
      *out = static_cast<DType>(v);
      return true;
    }
  }
  return false;
}

const TensorRecord* CheckpointData::FindTensor(std::string_view name) const {
  for (const TensorRecord& t : tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

uint64_t CheckpointData::ByteSize() const {
  uint64_t n = 0;
  for (const TensorRecord& t : tensors) n += t.bytes.size();
  for (const auto& [name, bytes] : sections) n += bytes.size();
  return n;
}

// ---- CheckpointStore ----------------------------------------------------------------------

struct CheckpointStore::Impl {
  StoreOptions options;
  rocksdb::Options rocks_options;
  std::unique_ptr<rocksdb::DB> db;
  // Released (~Impl) before db closes, as RocksDB requires.
  std::vector<std::unique_ptr<rocksdb::ColumnFamilyHandle>> handles;
  rocksdb::ColumnFamilyHandle* meta = nullptr;   // default: manifests, latest, identity
  rocksdb::ColumnFamilyHandle* ckpts = nullptr;  // "checkpoints": sections and chunks
  std::atomic<uint64_t> ingest_counter{0};

  // Serializes Save (the identity check, the commit and GC).
  std::mutex save_mu;
  // Readers of checkpoint data hold it shared; GC holds it exclusively while
  // it removes table files (DeleteFilesInRanges is not snapshot-safe).
  mutable std::shared_mutex files_mu;
  mutable std::mutex identity_mu;
  std::optional<StoreIdentity> identity;  // GUARDED_BY(identity_mu)

  ~Impl() {
    handles.clear();  // before db
  }

  // RAII snapshot: every read of a checkpoint sees one committed state.
  class Snapshot {
   public:
    explicit Snapshot(rocksdb::DB* db) : db_(db), snap_(db->GetSnapshot()) {}
    ~Snapshot() { db_->ReleaseSnapshot(snap_); }
    const rocksdb::Snapshot* get() const { return snap_; }

   private:
    rocksdb::DB* db_;
    const rocksdb::Snapshot* snap_;
  };

  Status FailAt(const char* point) const { return options.fault_hook ? options.fault_hook(point) : Status::OK(); }

  std::string IngestDir() const { return (fs::path(options.path) / kIngestDir).string(); }

  // The step of every checkpoint (every manifest key), highest first. With
  // `manifests`, also the raw manifest value of each.
  Status ListSteps(const rocksdb::Snapshot* snap, std::vector<int64_t>* steps,
                   std::vector<std::string>* manifests) const {
    steps->clear();
    if (manifests) manifests->clear();
    std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(MakeReadOptions(snap), meta));
    for (it->Seek(kCheckpointPrefix); it->Valid() && it->key().starts_with(kCheckpointPrefix); it->Next()) {
      int64_t step = 0;
      if (!ParseStepKey(it->key(), &step) || it->key() != ManifestKey(step)) {
        return Status::Corruption("store '" + options.path + "': unexpected key '" + it->key().ToString() + "'");
      }
      steps->push_back(step);
      if (manifests) manifests->push_back(it->value().ToString());
    }
    DTRAIN_RETURN_IF_ERROR(FromRocks(it->status(), "listing checkpoints in '" + options.path + "'"));
    std::reverse(steps->begin(), steps->end());
    if (manifests) std::reverse(manifests->begin(), manifests->end());
    return Status::OK();
  }

  Status GetManifest(const rocksdb::Snapshot* snap, int64_t step, CheckpointManifest* m) const {
    rocksdb::PinnableSlice value;
    rocksdb::Status s = db->Get(MakeReadOptions(snap), meta, ManifestKey(step), &value);
    if (s.IsNotFound()) {
      // A step whose keys exist without a manifest cannot come from Save.
      std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(MakeReadOptions(snap), ckpts));
      it->Seek(StepPrefix(step));
      if (it->Valid() && it->key().starts_with(StepPrefix(step))) {
        return Status::Corruption(CkptPrefix(step) + "the manifest is missing");
      }
      return Status::NotFound("no checkpoint " + std::to_string(step) + " in store '" + options.path + "'");
    }
    DTRAIN_RETURN_IF_ERROR(FromRocks(s, CkptPrefix(step) + "reading the manifest"));
    return DecodeManifest(step, value, m);
  }

  Status GetLatest(const rocksdb::Snapshot* snap, int64_t* step) const {
    std::string value;
    rocksdb::Status s = db->Get(MakeReadOptions(snap), meta, kLatestKey, &value);
    if (s.IsNotFound()) return Status::NotFound("store '" + options.path + "' holds no checkpoint");
    DTRAIN_RETURN_IF_ERROR(FromRocks(s, "reading 'latest' in '" + options.path + "'"));
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(value.c_str(), &end, 10);
    if (value.empty() || errno != 0 || *end != '\0' || v < 0) {
      return Status::Corruption("store '" + options.path + "': 'latest' holds '" + value + "', not a step");
    }
    *step = v;
    return Status::OK();
  }

  // Reads checkpoint `step` and checks it; fills `out` when non-null
  // (otherwise holds one chunk at a time).
  Status Read(int64_t step, CheckpointData* out) const {
    std::shared_lock<std::shared_mutex> files_lock(files_mu);
    Snapshot snap(db.get());
    CheckpointManifest m;
    DTRAIN_RETURN_IF_ERROR(GetManifest(snap.get(), step, &m));
    const std::string where = CkptPrefix(step);
    const rocksdb::ReadOptions ro = MakeReadOptions(snap.get());
    const std::string prefix = StepPrefix(step);
    const uint64_t chunk_bytes = m.chunk_bytes();
    if (chunk_bytes == 0 && m.tensors_size() > 0) return Status::Corruption(where + "manifest has chunk_bytes 0");

    if (out) {
      out->tensors.clear();
      out->tensors.reserve(m.tensors_size());
      out->sections.clear();
    }
    rocksdb::PinnableSlice value;
    for (int i = 0; i < m.tensors_size(); ++i) {
      const TensorEntry& e = m.tensors(i);
      const std::string tn = "tensor '" + e.name() + "'";
      const DType dtype = static_cast<DType>(e.dtype());
      const std::vector<int64_t> shape(e.shape().begin(), e.shape().end());
      uint64_t expected = 0;
      if (DTypeSize(dtype) == 0 || !ExpectedBytes(dtype, shape, &expected) || expected != e.byte_size() ||
          e.chunk_count() != (e.byte_size() + chunk_bytes - 1) / chunk_bytes) {
        return Status::Corruption(where + "the manifest entry of " + tn + " is inconsistent (dtype " +
                                  std::to_string(e.dtype()) + ", shape " + ShapeString(shape) + ", " +
                                  std::to_string(e.byte_size()) + " bytes in " + std::to_string(e.chunk_count()) +
                                  " chunks)");
      }
      TensorRecord* rec = nullptr;
      if (out) {
        rec = &out->tensors.emplace_back();
        rec->name = e.name();
        rec->dtype = dtype;
        rec->shape = shape;
        rec->bytes.reserve(e.byte_size());
      }
      uint32_t crc = 0;
      uint64_t read = 0;
      for (uint32_t c = 0; c < e.chunk_count(); ++c) {
        value.Reset();
        rocksdb::Status s = db->Get(ro, ckpts, ChunkKey(prefix, static_cast<size_t>(i), c), &value);
        const std::string chunk = "chunk " + std::to_string(c) + " of " + std::to_string(e.chunk_count());
        if (s.IsNotFound()) return Status::Corruption(where + tn + " " + chunk + " is missing");
        DTRAIN_RETURN_IF_ERROR(FromRocks(s, where + tn + " " + chunk));
        const uint64_t want = std::min<uint64_t>(chunk_bytes, e.byte_size() - read);
        if (value.size() != want) {
          return Status::Corruption(where + tn + " " + chunk + " has " + std::to_string(value.size()) +
                                    " bytes, expected " + std::to_string(want));
        }
        crc = crc32c::Extend(crc, value.data(), value.size());
        if (rec) rec->bytes.append(value.data(), value.size());
        read += value.size();
      }
      if (crc != e.crc32c()) {
        return Status::Corruption(where + tn + " fails its CRC32C check (stored " + Hex32(e.crc32c()) + ", computed " +
                                  Hex32(crc) + ")");
      }
    }
    for (const SectionEntry& e : m.sections()) {
      const std::string sn = "section '" + e.name() + "'";
      value.Reset();
      rocksdb::Status s = db->Get(ro, ckpts, SectionKey(step, e.name()), &value);
      if (s.IsNotFound()) return Status::Corruption(where + sn + " is missing");
      DTRAIN_RETURN_IF_ERROR(FromRocks(s, where + sn));
      if (value.size() != e.byte_size()) {
        return Status::Corruption(where + sn + " has " + std::to_string(value.size()) + " bytes, the manifest says " +
                                  std::to_string(e.byte_size()));
      }
      const uint32_t crc = crc32c::Value(value.data(), value.size());
      if (crc != e.crc32c()) {
        return Status::Corruption(where + sn + " fails its CRC32C check (stored " + Hex32(e.crc32c()) + ", computed " +
                                  Hex32(crc) + ")");
      }
      if (out) out->sections.emplace(e.name(), value.ToString());
    }
    if (out) {
      out->job_name = m.job_name();
      out->config_digest = m.config_digest();
      out->step = m.step();
      out->epoch = m.epoch();
      out->mode = m.mode();
      out->world_size = m.world_size();
      out->wall_time = m.wall_time();
    }
    return Status::OK();
  }

  // Emits the sections and chunks of checkpoint d.step into `data` (column
  // family "checkpoints"), computing their CRC32Cs into `man` on the way
  // (one pass over the bytes, while they are in cache), then the manifest,
  // the new `latest` and the identity (when it changes) into `meta_sink`
  // (default). Keys arrive in order in each sink.
  static rocksdb::Status EmitCheckpoint(const CheckpointData& d, CheckpointManifest* man, uint64_t chunk_bytes,
                                        const std::optional<StoreIdentity>& identity, KeySink* data,
                                        KeySink* meta_sink) {
    const std::string prefix = StepPrefix(d.step);
    // Deletes what an older copy of this step may have left (more tensors,
    // chunks or sections). The tombstone is older than the new keys (earlier
    // in the batch; in an ingested file it covers only older files).
    rocksdb::Status s = data->DeleteRange(prefix, StepEnd(d.step));
    int section = 0;
    for (auto it = d.sections.begin(); s.ok() && it != d.sections.end(); ++it, ++section) {
      man->mutable_sections(section)->set_crc32c(crc32c::Value(it->second));
      s = data->Put(SectionKey(d.step, it->first), it->second);
    }
    for (size_t i = 0; s.ok() && i < d.tensors.size(); ++i) {
      const std::string& b = d.tensors[i].bytes;
      TensorEntry* e = man->mutable_tensors(static_cast<int>(i));
      uint32_t crc = 0;
      for (uint32_t c = 0; s.ok() && c < e->chunk_count(); ++c) {
        const uint64_t off = c * chunk_bytes;
        const size_t len = static_cast<size_t>(std::min<uint64_t>(chunk_bytes, b.size() - off));
        crc = crc32c::Extend(crc, b.data() + off, len);
        s = data->Put(ChunkKey(prefix, i, c), rocksdb::Slice(b.data() + off, len));
      }
      e->set_crc32c(crc);
    }
    if (s.ok()) s = meta_sink->Put(ManifestKey(d.step), EncodeManifest(*man));
    if (s.ok()) s = meta_sink->Put(kLatestKey, std::to_string(d.step));
    if (s.ok() && identity) s = meta_sink->Put(kIdentityKey, identity->SerializeAsString());
    return s;
  }

  // Commits through SstFileWriter + one atomic IngestExternalFiles.
  Status CommitByIngestion(const CheckpointData& d, CheckpointManifest* man,
                           const std::optional<StoreIdentity>& identity) {
    const std::string where = CkptPrefix(d.step);
    std::error_code ec;
    fs::create_directories(IngestDir(), ec);
    if (ec) return Status::IOError(where + "cannot create '" + IngestDir() + "': " + ec.message());
    const std::string stem = IngestDir() + "/" + std::to_string(d.step) + "-" + std::to_string(::getpid()) + "-" +
                             std::to_string(ingest_counter++);
    TableSink data(rocks_options, ckpts, stem + "-data.sst");
    TableSink meta_sink(rocks_options, meta, stem + "-meta.sst");
    rocksdb::Status s = data.Open();
    if (s.ok()) s = meta_sink.Open();
    if (s.ok()) s = EmitCheckpoint(d, man, options.chunk_bytes, identity, &data, &meta_sink);
    if (s.ok()) s = data.Finish();
    if (s.ok()) s = meta_sink.Finish();
    DTRAIN_RETURN_IF_ERROR(FromRocks(s, where + "writing table files"));

    DTRAIN_RETURN_IF_ERROR(FailAt(fault_point::kBeforeCommit));
    std::vector<rocksdb::IngestExternalFileArg> args(2);
    args[0].column_family = ckpts;
    args[0].external_files = {data.path()};
    args[1].column_family = meta;
    args[1].external_files = {meta_sink.path()};
    for (auto& a : args) {
      a.options.move_files = true;           // hard link, no copy
      a.options.write_global_seqno = false;  // no rewrite of the file
    }
    return FromRocks(db->IngestExternalFiles(args), where + "committing");
  }

  // Commits through one WriteBatch written with sync.
  Status CommitByWriteBatch(const CheckpointData& d, CheckpointManifest* man,
                            const std::optional<StoreIdentity>& identity) {
    // One allocation for the whole batch: its copy of the bytes, the
    // manifest, plus ~64 bytes of key and framing per record.
    uint64_t records = 8 + d.sections.size();
    for (const TensorEntry& e : man->tensors()) records += e.chunk_count();
    rocksdb::WriteBatch batch(static_cast<size_t>(d.ByteSize() + man->ByteSizeLong() + records * 64));
    BatchSink data(&batch, ckpts), meta_sink(&batch, meta);
    DTRAIN_RETURN_IF_ERROR(FromRocks(EmitCheckpoint(d, man, options.chunk_bytes, identity, &data, &meta_sink),
                                     CkptPrefix(d.step) + "building the batch"));
    DTRAIN_RETURN_IF_ERROR(FailAt(fault_point::kBeforeCommit));
    rocksdb::WriteOptions wo;
    wo.sync = true;
    return FromRocks(db->Write(wo, &batch), CkptPrefix(d.step) + "committing");
  }

  // Deletes every checkpoint that is neither among the keep_last highest
  // steps nor `latest`, and any stray data below the oldest one kept: range
  // tombstones in both column families (not synced: a crash can at worst
  // bring a deleted checkpoint back), then the table files wholly inside them.
  Status CollectGarbage(int64_t latest) {
    if (options.keep_last <= 0) return Status::OK();
    std::vector<int64_t> steps;
    DTRAIN_RETURN_IF_ERROR(ListSteps(nullptr, &steps, nullptr));
    std::set<int64_t> keep(steps.begin(), steps.begin() + std::min<size_t>(steps.size(), options.keep_last));
    keep.insert(latest);
    std::vector<std::string> bounds;  // begin, end, begin, end, ...
    size_t deleted = 0;
    for (int64_t step : steps) {
      if (keep.count(step)) continue;
      ++deleted;
      if (step > *keep.begin()) {  // the rest go with the sweep below
        bounds.push_back(StepPrefix(step));
        bounds.push_back(StepEnd(step));
      }
    }
    if (deleted == 0) return Status::OK();
    bounds.push_back(kCheckpointPrefix);
    bounds.push_back(StepPrefix(*keep.begin()));
    rocksdb::WriteBatch batch;
    for (size_t i = 0; i < bounds.size(); i += 2) {
      batch.DeleteRange(meta, bounds[i], bounds[i + 1]);
      batch.DeleteRange(ckpts, bounds[i], bounds[i + 1]);
    }
    DTRAIN_RETURN_IF_ERROR(FromRocks(db->Write(rocksdb::WriteOptions(), &batch), "deleting old checkpoints"));
    std::vector<rocksdb::Slice> slices(bounds.begin(), bounds.end());
    std::vector<rocksdb::RangePtr> ranges;
    for (size_t i = 0; i < slices.size(); i += 2) ranges.emplace_back(&slices[i], &slices[i + 1]);
    // include_end: no key equals a range's end (StepEnd or a step prefix);
    // a file whose own tombstone ends there is wholly inside the range.
    std::unique_lock<std::shared_mutex> files_lock(files_mu);
    return FromRocks(rocksdb::DeleteFilesInRanges(db.get(), ckpts, ranges.data(), ranges.size(), /*include_end=*/true),
                     "removing the files of old checkpoints");
  }
};

CheckpointStore::CheckpointStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

CheckpointStore::~CheckpointStore() {
  if (impl_ && impl_->db && !impl_->options.read_only) {
    Status s = Flush();
    if (!s.ok()) spdlog::warn("checkpoint store '{}': flush on close failed: {}", impl_->options.path, s.ToString());
  }
}

Status CheckpointStore::Open(const StoreOptions& options, std::unique_ptr<CheckpointStore>* out) {
  if (options.path.empty()) return Status::InvalidArgument("checkpoint store: path is empty");
  if (options.chunk_bytes < 1 || options.chunk_bytes > kMaxChunkBytes) {
    return Status::InvalidArgument("checkpoint store: chunk_bytes must be in [1, 1 GiB], got " +
                                   std::to_string(options.chunk_bytes));
  }
  if (options.keep_last < 0) {
    return Status::InvalidArgument("checkpoint store: keep_last must be >= 0, got " +
                                   std::to_string(options.keep_last));
  }
  std::error_code ec;
  const bool exists = fs::exists(fs::path(options.path) / "CURRENT", ec);
  if (!exists && (options.read_only || !options.create_if_missing)) {
    return Status::NotFound("no checkpoint store at '" + options.path + "'");
  }
  if (!exists) {
    fs::create_directories(options.path, ec);
    if (ec) return Status::IOError("cannot create checkpoint store directory '" + options.path + "': " + ec.message());
  }

  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->rocks_options = MakeRocksOptions(options.write_path);
  const rocksdb::ColumnFamilyOptions cf_options(impl->rocks_options);
  const std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {{rocksdb::kDefaultColumnFamilyName, cf_options},
                                                            {kCheckpointsCf, cf_options}};
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* db = nullptr;
  rocksdb::Status s =
      options.read_only
          ? rocksdb::DB::OpenForReadOnly(rocksdb::DBOptions(impl->rocks_options), options.path, cfs, &handles, &db)
          : rocksdb::DB::Open(rocksdb::DBOptions(impl->rocks_options), options.path, cfs, &handles, &db);
  if (s.IsIOError() && s.ToString().find("lock") != std::string::npos) {
    return Status::FailedPrecondition("checkpoint store '" + options.path +
                                      "' is open for writing in another process (one process writes a store; "
                                      "open it read_only to inspect it): " +
                                      s.ToString());
  }
  DTRAIN_RETURN_IF_ERROR(FromRocks(s, "opening checkpoint store '" + options.path + "'"));
  impl->db.reset(db);
  for (rocksdb::ColumnFamilyHandle* h : handles) impl->handles.emplace_back(h);
  impl->meta = handles[0];
  impl->ckpts = handles[1];
  if (!options.read_only) {
    // Table files of a Save that died before its commit.
    fs::remove_all(impl->IngestDir(), ec);
  }

  std::string value;
  s = impl->db->Get(rocksdb::ReadOptions(), impl->meta, kIdentityKey, &value);
  if (!s.IsNotFound()) {
    DTRAIN_RETURN_IF_ERROR(FromRocks(s, "reading the identity of checkpoint store '" + options.path + "'"));
    StoreIdentity id;
    if (!id.ParseFromString(value)) {
      return Status::Corruption("checkpoint store '" + options.path + "': store/identity does not parse");
    }
    if (id.format_version() > kFormatVersion) {
      return Status::FailedPrecondition("checkpoint store '" + options.path + "' has format version " +
                                        std::to_string(id.format_version()) + "; this dtrain reads up to " +
                                        std::to_string(kFormatVersion));
    }
    if (!options.job_name.empty() && !Compatible(id, options.job_name, options.config_digest)) {
      if (!options.force) {
        return Status::FailedPrecondition(Refusal(options.path, id, options.job_name, options.config_digest));
      }
      spdlog::warn("{}; forced", Refusal(options.path, id, options.job_name, options.config_digest));
    }
    impl->identity = std::move(id);
  } else if (!options.read_only && !options.job_name.empty()) {
    StoreIdentity id;
    id.set_format_version(kFormatVersion);
    id.set_job_name(options.job_name);
    id.set_config_digest(options.config_digest);
    id.set_created_wall_time(NowUnixSeconds());
    rocksdb::WriteOptions wo;
    wo.sync = true;
    DTRAIN_RETURN_IF_ERROR(FromRocks(impl->db->Put(wo, impl->meta, kIdentityKey, id.SerializeAsString()),
                                     "writing the identity of checkpoint store '" + options.path + "'"));
    impl->identity = std::move(id);
  }
  out->reset(new CheckpointStore(std::move(impl)));
  return Status::OK();
}

Status CheckpointStore::Save(const CheckpointData& d) {
  Impl& m = *impl_;
  if (m.options.read_only) {
    return Status::FailedPrecondition("checkpoint store '" + m.options.path + "' was opened read_only");
  }
  DTRAIN_RETURN_IF_ERROR(ValidateData(d));
  std::lock_guard<std::mutex> save_lock(m.save_mu);

  // 2. Ownership.
  std::optional<StoreIdentity> new_identity;
  {
    std::lock_guard<std::mutex> lock(m.identity_mu);
    const bool owned = m.identity.has_value();
    if (owned && !Compatible(*m.identity, d.job_name, d.config_digest) && !m.options.force) {
      return Status::FailedPrecondition(Refusal(m.options.path, *m.identity, d.job_name, d.config_digest));
    }
    if (!owned || m.identity->job_name() != d.job_name || m.identity->config_digest() != d.config_digest) {
      StoreIdentity id;
      id.set_format_version(kFormatVersion);
      id.set_job_name(d.job_name);
      id.set_config_digest(d.config_digest);
      id.set_created_wall_time(NowUnixSeconds());
      new_identity = std::move(id);
    }
  }

  // 3. The manifest; EmitCheckpoint adds the CRC32Cs.
  const uint64_t chunk_bytes = m.options.chunk_bytes;
  CheckpointManifest man;
  man.set_format_version(kFormatVersion);
  man.set_job_name(d.job_name);
  man.set_config_digest(d.config_digest);
  man.set_step(d.step);
  man.set_epoch(d.epoch);
  man.set_mode(d.mode);
  man.set_world_size(d.world_size);
  man.set_wall_time(NowUnixSeconds());
  man.set_chunk_bytes(chunk_bytes);
  for (const TensorRecord& t : d.tensors) {
    TensorEntry* e = man.add_tensors();
    e->set_name(t.name);
    e->set_dtype(static_cast<TensorDType>(static_cast<int>(t.dtype)));
    for (int64_t dim : t.shape) e->add_shape(dim);
    e->set_byte_size(t.bytes.size());
    const uint64_t chunks = (t.bytes.size() + chunk_bytes - 1) / chunk_bytes;
    if (chunks >= kMaxIndex) {
      return Status::InvalidArgument(CkptPrefix(d.step) + "tensor '" + t.name + "' needs " + std::to_string(chunks) +
                                     " chunks; raise chunk_bytes");
    }
    e->set_chunk_count(static_cast<uint32_t>(chunks));
  }
  for (const auto& [name, bytes] : d.sections) {
    SectionEntry* e = man.add_sections();
    e->set_name(name);
    e->set_byte_size(bytes.size());
  }

  // 4-6. Commit.
  DTRAIN_RETURN_IF_ERROR(m.options.write_path == WritePath::kIngest ? m.CommitByIngestion(d, &man, new_identity)
                                                                    : m.CommitByWriteBatch(d, &man, new_identity));
  if (new_identity) {
    std::lock_guard<std::mutex> lock(m.identity_mu);
    m.identity = std::move(new_identity);
  }

  // 7. Garbage collection; the checkpoint is safe whatever happens here.
  Status gc = m.FailAt(fault_point::kBeforeGc);
  if (gc.ok()) gc = m.CollectGarbage(d.step);
  if (!gc.ok()) {
    spdlog::warn(
        "checkpoint store '{}': checkpoint {} is saved, but deleting old checkpoints failed (the next save "
        "retries): {}",
        m.options.path, d.step, gc.ToString());
  }
  (void)m.FailAt(fault_point::kAfterGc);
  return Status::OK();
}

Status CheckpointStore::List(std::vector<CheckpointInfo>* out) const {
  out->clear();
  std::shared_lock<std::shared_mutex> files_lock(impl_->files_mu);
  Impl::Snapshot snap(impl_->db.get());
  std::vector<int64_t> steps;
  std::vector<std::string> manifests;
  DTRAIN_RETURN_IF_ERROR(impl_->ListSteps(snap.get(), &steps, &manifests));
  int64_t latest = -1;
  Status ls = impl_->GetLatest(snap.get(), &latest);
  if (!ls.ok() && ls.code() != Status::Code::kNotFound && ls.code() != Status::Code::kCorruption) return ls;
  for (size_t i = 0; i < steps.size(); ++i) {
    CheckpointInfo info;
    info.step = steps[i];
    info.latest = steps[i] == latest;
    CheckpointManifest m;
    Status s = manifests[i].empty() ? Status::Corruption(CkptPrefix(steps[i]) + "the manifest is missing")
                                    : DecodeManifest(steps[i], manifests[i], &m);
    if (s.ok()) {
      info.epoch = m.epoch();
      info.mode = m.mode();
      info.world_size = m.world_size();
      info.wall_time = m.wall_time();
      for (const TensorEntry& e : m.tensors()) info.bytes += e.byte_size();
      for (const SectionEntry& e : m.sections()) info.bytes += e.byte_size();
      info.tensor_count = m.tensors_size();
      info.section_count = m.sections_size();
    } else {
      info.error = s.message();
    }
    out->push_back(std::move(info));
  }
  return Status::OK();
}

Status CheckpointStore::LatestStep(int64_t* step) const { return impl_->GetLatest(nullptr, step); }

Status CheckpointStore::Load(int64_t step, CheckpointData* out) const { return impl_->Read(step, out); }

Status CheckpointStore::Verify(int64_t step) const { return impl_->Read(step, nullptr); }

Status CheckpointStore::ReadManifest(int64_t step, CheckpointManifest* out) const {
  std::shared_lock<std::shared_mutex> files_lock(impl_->files_mu);
  return impl_->GetManifest(nullptr, step, out);
}

Status CheckpointStore::LoadLatestGood(CheckpointData* out, std::vector<std::string>* warnings) const {
  std::vector<std::string> local;
  std::vector<std::string>& warn = warnings ? *warnings : local;
  std::vector<int64_t> steps;
  Status list = impl_->ListSteps(nullptr, &steps, nullptr);
  if (list.code() == Status::Code::kCorruption) {
    warn.push_back(list.message() + "; only 'latest' can be tried");
    steps.clear();
  } else if (!list.ok()) {
    return list;
  }
  int64_t latest = -1;
  Status ls = impl_->GetLatest(nullptr, &latest);
  if (ls.code() == Status::Code::kNotFound && steps.empty()) return ls;
  std::vector<int64_t> candidates;
  if (ls.ok()) {
    candidates.push_back(latest);
    for (int64_t s : steps) {
      if (s < latest) candidates.push_back(s);
    }
  } else if (ls.code() == Status::Code::kCorruption || ls.code() == Status::Code::kNotFound) {
    warn.push_back(ls.message() + "; trying every checkpoint, newest first");
    candidates = steps;
  } else {
    return ls;
  }
  for (size_t i = 0; i < candidates.size(); ++i) {
    Status s = Load(candidates[i], out);
    if (s.ok()) {
      if (i > 0) {
        warn.push_back("loaded checkpoint " + std::to_string(candidates[i]) + " instead of the latest, " +
                       std::to_string(candidates[0]));
      }
      return Status::OK();
    }
    if (s.code() != Status::Code::kCorruption && s.code() != Status::Code::kNotFound) return s;
    warn.push_back("skipping checkpoint " + std::to_string(candidates[i]) + ": " + s.message());
  }
  *out = CheckpointData();
  return Status::Corruption("no intact checkpoint in store '" + impl_->options.path + "' (" +
                            std::to_string(candidates.size()) + " tried)");
}

Status CheckpointStore::Flush() {
  if (impl_->options.read_only) return Status::OK();
  rocksdb::FlushOptions fo;
  return FromRocks(impl_->db->Flush(fo, {impl_->meta, impl_->ckpts}),
                   "flushing checkpoint store '" + impl_->options.path + "'");
}

std::string CheckpointStore::owner_job_name() const {
  std::lock_guard<std::mutex> lock(impl_->identity_mu);
  return impl_->identity ? impl_->identity->job_name() : std::string();
}

std::string CheckpointStore::owner_config_digest() const {
  std::lock_guard<std::mutex> lock(impl_->identity_mu);
  return impl_->identity ? impl_->identity->config_digest() : std::string();
}

const std::string& CheckpointStore::path() const { return impl_->options.path; }

// ---- AsyncCheckpointWriter -----------------------------------------------------------------

AsyncCheckpointWriter::AsyncCheckpointWriter(CheckpointStore* store) : store_(store), thread_([this] { Run(); }) {}

AsyncCheckpointWriter::~AsyncCheckpointWriter() {
  Status s = Flush();
  if (!s.ok()) spdlog::warn("asynchronous checkpoint save failed: {}", s.ToString());
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void AsyncCheckpointWriter::Submit(CheckpointData&& snapshot) {
  std::optional<CheckpointData> dropped;  // freed after the lock is released
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.submitted;
    if (pending_) {
      ++stats_.coalesced;
      dropped = std::move(pending_);
    }
    pending_ = std::move(snapshot);
  }
  cv_.notify_all();
}

Status AsyncCheckpointWriter::Flush() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return !pending_ && !busy_; });
  Status s = first_error_;
  first_error_ = Status::OK();
  return s;
}

Status AsyncCheckpointWriter::last_error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return last_error_;
}

AsyncWriterStats AsyncCheckpointWriter::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void AsyncCheckpointWriter::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [this] { return stop_ || pending_.has_value(); });
    if (!pending_) return;  // stopping, nothing left
    std::optional<CheckpointData> job = std::move(pending_);
    pending_.reset();
    busy_ = true;
    lock.unlock();
    const int64_t step = job->step;
    Status s = store_->Save(*job);
    job.reset();
    if (!s.ok()) spdlog::warn("asynchronous save of checkpoint {} failed: {}", step, s.ToString());
    lock.lock();
    busy_ = false;
    if (s.ok()) {
      ++stats_.written;
      stats_.last_written_step = step;
    } else {
      ++stats_.failed;
      last_error_ = s;
      if (first_error_.ok()) first_error_ = s;
    }
    cv_.notify_all();
  }
}

}  // namespace dtrain
