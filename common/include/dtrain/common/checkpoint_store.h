// The checkpoint store: checkpoints of a training job in a RocksDB database in
// one directory (default <run dir>/store; any path, e.g. on a shared
// filesystem).
//
// A checkpoint is a CheckpointData: manifest fields (job, config digest, step,
// epoch, mode, world size), tensors (name, dtype, shape, raw little-endian
// bytes) and free-form sections (trainer state, strategy state). The store
// knows nothing about torch: the trainer turns its tensors into TensorRecords
// and back. The format is the same in every mode.
//
// ---- Who writes -------------------------------------------------------------
// Exactly one process opens a store for writing; RocksDB's LOCK file makes a
// second writer's Open fail (FailedPrecondition). Readers that must not
// disturb a running job (`dtrain ckpt list|inspect`) open it `read_only`.
//   local, sync:  rank 0 (after the all-reduce every replica is identical).
//   async:        rank 0, the chief worker: it pulls the parameters from the
//                 parameter-server shards and stores their optimizer state in
//                 the "strategy" section.
//   pipeline:     rank 0, after gathering every stage's parameters and
//                 optimizer state; stage ownership goes in "strategy".
// Other ranks never open the store; on resume rank 0 loads and distributes.
//
// ---- Layout (keys of the RocksDB database) -----------------------------------
// Column family "default" (small values):
//   store/identity                 StoreIdentity: job name + config digest of
//                                  the job that owns the store
//   latest                         decimal step of the newest committed save
//   ckpt/<step>/manifest           CRC32C (4 bytes, little-endian) of the
//                                  serialized CheckpointManifest, then it
// Column family "checkpoints" (the bytes):
//   ckpt/<step>/s/<section name>   a section's bytes
//   ckpt/<step>/t/<index>/<chunk>  a tensor's bytes, chunk_bytes per chunk
// <step> is zero-padded to 20 digits, <index> and <chunk> to 8, so keys sort
// by step and a checkpoint is one contiguous key range in each family.
// Manifests live apart from the bytes so that listing never reads tensor
// data and a damaged data block cannot hide the other checkpoints. Nothing is
// compressed: trained float weights are close to random bytes.
//
// ---- Save protocol (CheckpointStore::Save) ------------------------------------
// 1. Validate the CheckpointData (names, dtypes, shapes, byte sizes, step >= 0,
//    job name) before touching anything: bad input is InvalidArgument naming
//    the tensor.
// 2. Check ownership: a checkpoint of another job or config digest than the
//    store's identity is refused unless StoreOptions::force (which hands the
//    store to this job: its identity is rewritten in the same commit).
// 3. Build the manifest.
// 4. Write the checkpoint's sections and chunks, in key order, into a new
//    table file under <store>/ingest/ (RocksDB's SstFileWriter), computing
//    their CRC32Cs on the way, then the manifest, `latest` = step (and the
//    identity when it changes) into a second one; both are fsynced. The first file starts with a range
//    tombstone over the step, which deletes only keys of an older copy.
// 5. Fault point "save.before_commit".
// 6. Commit: ONE IngestExternalFiles call moves both files into the database
//    (hard links), fsyncs them and the directory, and records them in ONE
//    synced MANIFEST edit, atomically for both column families. Only now is
//    the checkpoint visible, complete and durable; a crash at any earlier
//    moment leaves the store exactly as it was (Open removes the leftover
//    files under ingest/; RocksDB removes files it never recorded).
// 7. Fault point "save.before_gc". Garbage collection (keep_last): range
//    tombstones (one unsynced batch) over every checkpoint that is neither
//    among the keep_last highest steps nor the one `latest` names, and over
//    any stray data below the oldest one kept; then the removal of the table
//    files wholly inside them (DeleteFilesInRanges; a RocksDB background
//    thread unlinks them right away, no compaction needed). A GC failure does not fail the Save (the checkpoint is committed);
//    it is logged and retried by the next Save. Fault point "save.after_gc".
// With WritePath::kWriteBatch, steps 4-6 are instead: the same keys go into
// ONE WriteBatch across both column families, written with
// WriteOptions::sync (through RocksDB's write-ahead log and memtable).
//
// Why table files instead of a WriteBatch (bench/checkpoint, 128 MiB model,
// project machine): a synced WriteBatch passes every byte through the
// write-ahead log, whose CRC32C Debian's portable RocksDB build computes in
// software, and copies it twice more (batch, memtable) before a flush writes
// it a second time: 0.25 of plain write+fsync bandwidth. The table file is
// written once, with XXH3 block checksums: 0.84. Its commit is just as
// atomic and durable, and it needs no copy of the checkpoint in memory.
//
// ---- Reading -----------------------------------------------------------------
// Load verifies the manifest's own CRC, then every chunk's size and every
// tensor's and section's byte size and CRC32C; a mismatch is Corruption
// naming the checkpoint and the tensor. LoadLatestGood tries `latest`, then
// every older checkpoint, newest first, and says in `warnings` which ones it
// skipped and why. Reads use a RocksDB snapshot (and exclude GC's file
// removal): a concurrent Save or GC never shows a reader half a checkpoint.
//
// ---- Limits -------------------------------------------------------------------
// kIngest holds no extra copy of the checkpoint in memory (SstFileWriter
// streams one block at a time), so model size is bounded by disk only; the
// caller's CheckpointData is the one copy. kWriteBatch holds two more (the
// batch and the memtable), fine up to ~1 GB. A tensor has at most 10^8
// chunks and a checkpoint at most 10^8 tensors. A checkpoint that is
// re-saved with the same step, or a step saved again after GC deleted it,
// can leave table files that only a later compaction frees.
//
// Thread-safety: CheckpointStore is thread-safe; Saves are serialized
// internally, reads run concurrently with them.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "dtrain/common/status.h"

namespace dtrain {

class CheckpointManifest;  // dtrain/checkpoint.pb.h

// Element type of a tensor; the values are those of TensorDType in
// checkpoint.proto.
enum class DType : int {
  kFloat32 = 1,
  kFloat64 = 2,
  kFloat16 = 3,
  kBFloat16 = 4,
  kInt64 = 5,
  kInt32 = 6,
  kUInt8 = 7,
  kBool = 8,
};

// Bytes per element (kBool: 1); 0 for a value outside the enum.
size_t DTypeSize(DType dtype);
// "float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8", "bool".
const char* DTypeName(DType dtype);
// Inverse of DTypeName; false for an unknown name.
bool ParseDType(std::string_view name, DType* out);

struct TensorRecord {
  // Unique within a checkpoint and non-empty, e.g. "model.layers.4.fc.weight".
  std::string name;
  DType dtype = DType::kFloat32;
  // Every dimension >= 0; {} is a scalar (one element).
  std::vector<int64_t> shape;
  // Raw little-endian contents, row-major; size() must equal
  // product(shape) x DTypeSize(dtype).
  std::string bytes;
};

struct CheckpointData {
  // The job that saved it (non-empty) and the digest of the parts of its
  // config that checkpoints depend on; the caller decides what goes into the
  // digest, the store compares it for equality.
  std::string job_name;
  std::string config_digest;
  // Global step (>= 0) and epoch of the state saved.
  int64_t step = 0;
  int64_t epoch = 0;
  // "sync", "async", "pipeline" or "local"; recorded, not interpreted.
  std::string mode;
  int32_t world_size = 1;
  // Unix seconds of the commit: set by Save (the value passed is ignored),
  // filled by Load.
  int64_t wall_time = 0;
  std::vector<TensorRecord> tensors;
  // Free-form blobs by name: trainer state (sampler position, RNG states,
  // LR-schedule position), "strategy" (PS shard state, pipeline stages)...
  std::map<std::string, std::string> sections;

  // The tensor called `name`, or nullptr.
  const TensorRecord* FindTensor(std::string_view name) const;
  // Bytes of all tensors and sections.
  uint64_t ByteSize() const;
};

// One line of CheckpointStore::List.
struct CheckpointInfo {
  int64_t step = 0;
  int64_t epoch = 0;
  std::string mode;
  int32_t world_size = 0;
  int64_t wall_time = 0;
  // Tensor and section bytes (not counting keys and the manifest).
  uint64_t bytes = 0;
  int64_t tensor_count = 0;
  int64_t section_count = 0;
  // True for the checkpoint `latest` names.
  bool latest = false;
  // Non-empty when the manifest cannot be read (the checkpoint is unusable);
  // the fields above other than step and latest are then 0.
  std::string error;
};

// Named points in Save where StoreOptions::fault_hook is called.
namespace fault_point {
// The new checkpoint is written (kIngest: in table files outside the
// database; kWriteBatch: in the batch) but not committed. An error fails the
// Save and leaves the store as it was.
inline constexpr const char* kBeforeCommit = "save.before_commit";
// The checkpoint is committed and synced; GC has not run. An error skips GC
// (as a real GC failure would); the Save still succeeds.
inline constexpr const char* kBeforeGc = "save.before_gc";
// GC is done (or skipped). The hook's status is ignored.
inline constexpr const char* kAfterGc = "save.after_gc";
}  // namespace fault_point

// Called at each fault_point during a Save, on the thread running the Save.
// Tests return an error to fail that step, or end the process there (the way
// LevelDB's tests wrap their Env). Production code leaves it empty.
using FaultHook = std::function<Status(const char* point)>;

enum class WritePath {
  // Table files written with SstFileWriter, committed by one atomic
  // IngestExternalFiles call.
  kIngest,
  // One WriteBatch written with sync (through the write-ahead log); slower,
  // kept for comparison (bench/checkpoint).
  kWriteBatch,
};

struct StoreOptions {
  // Directory of the store (created with its parents when missing). Required.
  std::string path;
  // Create an empty store when `path` holds none. Default: true.
  bool create_if_missing = true;
  // Open without taking the writer lock (a job may be writing it): Save fails
  // with FailedPrecondition; readers see the state as of Open. Default: false.
  bool read_only = false;
  // Keep the newest keep_last checkpoints (by step; the one `latest` names is
  // always kept); 0 keeps every checkpoint. Default: 3.
  int keep_last = 3;
  // Tensors are stored in chunks of at most this many bytes, 1 to 1 GiB.
  // Default: 4 MiB.
  uint64_t chunk_bytes = 4ull << 20;
  // The job and config digest expected to own the store; empty: not checked.
  // A store that another job created, or whose config digest differs, is
  // refused with FailedPrecondition naming both, unless `force`.
  std::string job_name;
  std::string config_digest;
  // Accept a store owned by another job or config digest; the next Save makes
  // this job its owner. Default: false.
  bool force = false;
  // How a Save commits (see "Save protocol"). Default: kIngest.
  WritePath write_path = WritePath::kIngest;
  // Fault injection for tests; see fault_point. Default: none.
  FaultHook fault_hook;
};

class CheckpointStore {
 public:
  // Opens (or creates) the store at options.path and checks its identity
  // against options.job_name / config_digest. Errors: InvalidArgument (bad
  // options), NotFound (no store and !create_if_missing or read_only),
  // FailedPrecondition (foreign store, or another process holds it for
  // writing), Corruption, IOError.
  static Status Open(const StoreOptions& options, std::unique_ptr<CheckpointStore>* out);

  // Flush()es (so the next Open need not replay the log) and closes the
  // database.
  ~CheckpointStore();

  CheckpointStore(const CheckpointStore&) = delete;
  CheckpointStore& operator=(const CheckpointStore&) = delete;

  // Saves `data` as checkpoint data.step and moves `latest` to it, atomically
  // and durably (see "Save protocol"). An existing checkpoint with the same
  // step is replaced. Blocking: returns when the commit is on disk.
  Status Save(const CheckpointData& data);

  // Every checkpoint, highest step first.
  Status List(std::vector<CheckpointInfo>* out) const;

  // The step `latest` names; NotFound when the store holds no checkpoint.
  Status LatestStep(int64_t* step) const;

  // Loads checkpoint `step`, verifying every size and CRC32C. NotFound when
  // there is none; Corruption naming the step and the tensor or section.
  // On error *out is unspecified.
  Status Load(int64_t step, CheckpointData* out) const;

  // Loads `latest`; when it is corrupt, the newest older checkpoint that is
  // intact. Each skipped checkpoint adds a line to `warnings` (may be null)
  // saying which and why. NotFound when the store is empty; Corruption when
  // no checkpoint is intact.
  Status LoadLatestGood(CheckpointData* out, std::vector<std::string>* warnings) const;

  // The manifest of checkpoint `step` alone (its own CRC checked, tensor data
  // not read).
  Status ReadManifest(int64_t step, CheckpointManifest* out) const;

  // Reads every chunk and section of checkpoint `step` and checks sizes and
  // CRC32Cs like Load, holding one chunk at a time in memory.
  Status Verify(int64_t step) const;

  // Writes RocksDB's memtables to table files and waits for it (with kIngest
  // they hold only deletions and the identity). No-op when read_only.
  Status Flush();

  // The job name and config digest of the store's identity; empty while the
  // store has none (a new store opened without a job name).
  std::string owner_job_name() const;
  std::string owner_config_digest() const;

  const std::string& path() const;

  struct Impl;

 private:
  explicit CheckpointStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

struct AsyncWriterStats {
  int64_t submitted = 0;
  // Saves that committed / failed.
  int64_t written = 0;
  int64_t failed = 0;
  // Snapshots dropped because a newer one was submitted before they started.
  int64_t coalesced = 0;
  // Step of the last committed save; -1 before the first.
  int64_t last_written_step = -1;
};

// Saves checkpoints on one background thread, so that the training thread
// only pays for the snapshot (its copy of the tensor bytes).
//
// Coalescing: at most one save is in flight and at most one snapshot waits.
// A Submit while a snapshot is already waiting replaces it (the older one is
// dropped and counted in stats().coalesced): a newer checkpoint supersedes an
// older one that has not started. Memory is thereby bounded by two snapshots
// (plus, with WritePath::kWriteBatch, the batch copy of the one in flight),
// and the training thread never blocks on the disk. The newest snapshot
// submitted is always written. (Waiting instead would stall training
// whenever saves come faster than the disk; dropping the newest would lose
// the most valuable checkpoint.)
//
// Thread-safety: Submit, Flush, last_error and stats may be called from any
// thread. The store must outlive the writer and may be used by others
// meanwhile (CheckpointStore is thread-safe).
class AsyncCheckpointWriter {
 public:
  explicit AsyncCheckpointWriter(CheckpointStore* store);
  // Flushes (errors are logged), then stops the thread.
  ~AsyncCheckpointWriter();

  AsyncCheckpointWriter(const AsyncCheckpointWriter&) = delete;
  AsyncCheckpointWriter& operator=(const AsyncCheckpointWriter&) = delete;

  // Queues `snapshot` for saving and returns at once (never does I/O).
  void Submit(CheckpointData&& snapshot);

  // Blocks until every snapshot submitted so far is written, failed or
  // coalesced. Returns the first Save error since the previous Flush (and
  // clears it); OK when there was none.
  Status Flush();

  // The status of the most recent failed Save (OK when none failed); not
  // cleared by Flush.
  Status last_error() const;

  AsyncWriterStats stats() const;

 private:
  void Run();

  CheckpointStore* const store_;
  mutable std::mutex mu_;
  std::condition_variable cv_;             // signals pending_/busy_/stop_ changes
  std::optional<CheckpointData> pending_;  // GUARDED_BY(mu_)
  bool busy_ = false;                      // GUARDED_BY(mu_): a Save is running
  bool stop_ = false;                      // GUARDED_BY(mu_)
  Status first_error_;                     // GUARDED_BY(mu_): since the last Flush
  Status last_error_;                      // GUARDED_BY(mu_)
  AsyncWriterStats stats_;                 // GUARDED_BY(mu_)
  std::thread thread_;                     // runs Run(); started last
};

}  // namespace dtrain
