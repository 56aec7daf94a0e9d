// Tests of the checkpoint store (common/checkpoint_store.h) and CRC32C.
//
// Faults are injected through StoreOptions::fault_hook at the named points of
// the real Save path, corruption by rewriting values with the RocksDB API (the
// layout is documented in checkpoint_store.h) or flipping a byte of a table file,
// and crashes by SIGKILLing checkpoint_crash_writer, a child process.
#include "dtrain/common/checkpoint_store.h"

#include "crash_checkpoint.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <thread>

#include "dtrain/checkpoint.pb.h"
#include "dtrain/common/crc32c.h"

extern char** environ;

namespace dtrain {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

// ---- CRC32C -----------------------------------------------------------------------

TEST(Crc32cTest, MatchesPublishedCheckValues) {
  EXPECT_EQ(crc32c::Value("123456789", 9), 0xE3069283u);
  std::string zeros(32, '\0'), ones(32, '\xff'), inc(32, 0), dec(32, 0);
  for (int i = 0; i < 32; ++i) {
    inc[i] = static_cast<char>(i);
    dec[i] = static_cast<char>(31 - i);
  }
  // RFC 3720 (iSCSI), appendix B.4.
  EXPECT_EQ(crc32c::Value(zeros), 0x8A9136AAu);
  EXPECT_EQ(crc32c::Value(ones), 0x62A8AB43u);
  EXPECT_EQ(crc32c::Value(inc), 0x46DD794Eu);
  EXPECT_EQ(crc32c::Value(dec), 0x113FDB5Cu);
  EXPECT_EQ(crc32c::Value("", 0), 0u);
}

TEST(Crc32cTest, HardwareAndTableAgreeAtEveryLengthAndAlignment) {
  std::mt19937_64 rng(7);
  std::string buf(4096 + 64, '\0');
  for (char& c : buf) c = static_cast<char>(rng());
  for (size_t offset = 0; offset < 8; ++offset) {
    for (size_t n = 0; n < 300; ++n) {
      const uint32_t table = crc32c::internal::ExtendTable(0, buf.data() + offset, n);
      if (crc32c::HardwareAccelerated()) {
        ASSERT_EQ(crc32c::internal::ExtendSse42(0, buf.data() + offset, n), table) << offset << " " << n;
      }
      ASSERT_EQ(crc32c::Value(buf.data() + offset, n), table);
    }
  }
  EXPECT_EQ(crc32c::Value(buf), crc32c::internal::ExtendTable(0, buf.data(), buf.size()));
}

TEST(Crc32cTest, HardwareAndTableAgreeOnLongBuffers) {
  // Long enough for the three-lane path of the SSE4.2 implementation.
  std::mt19937_64 rng(11);
  std::string buf(200000, '\0');
  for (char& c : buf) c = static_cast<char>(rng());
  for (size_t offset : {0, 1, 5}) {
    for (size_t n : {12287, 12288, 12289, 24576 + 7, 199990}) {
      const uint32_t table = crc32c::internal::ExtendTable(0x12345678u, buf.data() + offset, n);
      EXPECT_EQ(crc32c::Extend(0x12345678u, buf.data() + offset, n), table) << offset << " " << n;
    }
  }
}

TEST(Crc32cTest, ExtendEqualsValueOfConcatenation) {
  const std::string a = "hello, ", b = "checkpoint store";
  EXPECT_EQ(crc32c::Extend(crc32c::Value(a), b.data(), b.size()), crc32c::Value(a + b));
}

// ---- helpers ---------------------------------------------------------------------------

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/dtrain_ckpt_test_XXXXXX";
    const char* p = mkdtemp(tmpl);
    if (p == nullptr) std::abort();
    path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string s(n, '\0');
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t v = rng();
    std::memcpy(&s[i], &v, std::min<size_t>(8, n - i));
  }
  return s;
}

TensorRecord Tensor(std::string name, DType dtype, std::vector<int64_t> shape, uint64_t seed) {
  TensorRecord t;
  t.name = std::move(name);
  t.dtype = dtype;
  t.shape = std::move(shape);
  int64_t n = 1;
  for (int64_t d : t.shape) n *= d;
  t.bytes = RandomBytes(static_cast<size_t>(n) * DTypeSize(dtype), seed);
  return t;
}

// A small checkpoint (a few KiB) whose contents depend on `step`.
CheckpointData SmallCheckpoint(int64_t step, const std::string& job = "job_a", const std::string& digest = "d1") {
  CheckpointData d;
  d.job_name = job;
  d.config_digest = digest;
  d.step = step;
  d.epoch = step / 100;
  d.mode = "sync";
  d.world_size = 4;
  d.tensors.push_back(Tensor("fc.weight", DType::kFloat32, {16, 32}, step * 10 + 1));
  d.tensors.push_back(Tensor("fc.bias", DType::kFloat32, {16}, step * 10 + 2));
  d.sections["trainer"] = "step=" + std::to_string(step);
  return d;
}

void ExpectSameData(const CheckpointData& got, const CheckpointData& want) {
  EXPECT_EQ(got.job_name, want.job_name);
  EXPECT_EQ(got.config_digest, want.config_digest);
  EXPECT_EQ(got.step, want.step);
  EXPECT_EQ(got.epoch, want.epoch);
  EXPECT_EQ(got.mode, want.mode);
  EXPECT_EQ(got.world_size, want.world_size);
  ASSERT_EQ(got.tensors.size(), want.tensors.size());
  for (size_t i = 0; i < want.tensors.size(); ++i) {
    SCOPED_TRACE(want.tensors[i].name);
    EXPECT_EQ(got.tensors[i].name, want.tensors[i].name);
    EXPECT_EQ(got.tensors[i].dtype, want.tensors[i].dtype);
    EXPECT_EQ(got.tensors[i].shape, want.tensors[i].shape);
    EXPECT_TRUE(got.tensors[i].bytes == want.tensors[i].bytes);
  }
  EXPECT_EQ(got.sections, want.sections);
}

std::vector<int64_t> Steps(const CheckpointStore& store) {
  std::vector<CheckpointInfo> infos;
  EXPECT_TRUE(store.List(&infos).ok());
  std::vector<int64_t> steps;
  for (const CheckpointInfo& i : infos) steps.push_back(i.step);
  return steps;
}

std::string Key(int64_t step, const std::string& rest) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%020lld", static_cast<long long>(step));
  return std::string("ckpt/") + buf + "/" + rest;
}

// Opens a closed store's database with the RocksDB API: both column families.
struct RawDb {
  explicit RawDb(const std::string& dir, bool read_only = false) {
    std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {{rocksdb::kDefaultColumnFamilyName, {}}, {"checkpoints", {}}};
    std::vector<rocksdb::ColumnFamilyHandle*> h;
    rocksdb::DB* raw = nullptr;
    rocksdb::Status s = read_only ? rocksdb::DB::OpenForReadOnly(rocksdb::DBOptions(), dir, cfs, &h, &raw)
                                  : rocksdb::DB::Open(rocksdb::DBOptions(), dir, cfs, &h, &raw);
    EXPECT_TRUE(s.ok()) << s.ToString();
    db.reset(raw);
    for (auto* x : h) handles.emplace_back(x);
  }
  ~RawDb() { handles.clear(); }
  rocksdb::ColumnFamilyHandle* checkpoints() const { return handles[1].get(); }
  std::unique_ptr<rocksdb::DB> db;
  std::vector<std::unique_ptr<rocksdb::ColumnFamilyHandle>> handles;
};

// Rewrites one value of a closed store: manifests are in the default column
// family, sections and chunks in "checkpoints".
void RewriteValue(const std::string& dir, const std::string& key, const std::function<void(std::string*)>& edit) {
  RawDb raw(dir);
  ASSERT_NE(raw.db, nullptr);
  rocksdb::ColumnFamilyHandle* cf =
      key.find("/manifest") != std::string::npos ? raw.handles[0].get() : raw.checkpoints();
  std::string value;
  ASSERT_TRUE(raw.db->Get(rocksdb::ReadOptions(), cf, key, &value).ok()) << key;
  edit(&value);
  rocksdb::WriteOptions wo;
  wo.sync = true;
  ASSERT_TRUE(raw.db->Put(wo, cf, key, value).ok());
}

const char* PathName(WritePath p) { return p == WritePath::kIngest ? "Ingest" : "WriteBatch"; }

class StoreTestBase : public ::testing::Test {
 protected:
  StoreOptions Options() const {
    StoreOptions o;
    o.path = dir_.path() + "/store";
    o.job_name = "job_a";
    o.config_digest = "d1";
    o.write_path = write_path_;
    return o;
  }
  std::unique_ptr<CheckpointStore> OpenStore(const StoreOptions& o) {
    std::unique_ptr<CheckpointStore> s;
    Status st = CheckpointStore::Open(o, &s);
    EXPECT_TRUE(st.ok()) << st;
    return s;
  }
  std::unique_ptr<CheckpointStore> OpenStore() { return OpenStore(Options()); }

  TempDir dir_;
  WritePath write_path_ = WritePath::kIngest;
};

// Every test of this suite runs with both write paths.
class CheckpointStoreTest : public StoreTestBase, public ::testing::WithParamInterface<WritePath> {
 protected:
  void SetUp() override { write_path_ = GetParam(); }
};

INSTANTIATE_TEST_SUITE_P(Checkpoint, CheckpointStoreTest, ::testing::Values(WritePath::kIngest, WritePath::kWriteBatch),
                         [](const ::testing::TestParamInfo<WritePath>& i) { return PathName(i.param); });

// ---- round trip, listing, GC -------------------------------------------------------------

TEST_P(CheckpointStoreTest, SaveLoadRoundTripsTensorsOfEveryDtypeAndSections) {
  CheckpointData d = SmallCheckpoint(1200);
  d.epoch = 7;
  d.mode = "async";
  // 5 MiB + 12 bytes: two chunks of the default 4 MiB.
  d.tensors.push_back(Tensor("layers.4.fc.weight", DType::kFloat32, {5 * (1 << 20) / 4 + 3}, 99));
  d.tensors.push_back(Tensor("f64", DType::kFloat64, {3, 2}, 3));
  d.tensors.push_back(Tensor("f16", DType::kFloat16, {7}, 4));
  d.tensors.push_back(Tensor("bf16", DType::kBFloat16, {2, 2, 2}, 5));
  d.tensors.push_back(Tensor("bn.num_batches_tracked", DType::kInt64, {}, 6));
  d.tensors.push_back(Tensor("i32", DType::kInt32, {4}, 7));
  d.tensors.push_back(Tensor("u8", DType::kUInt8, {5}, 8));
  d.tensors.push_back(Tensor("mask", DType::kBool, {3}, 9));
  d.tensors.push_back(Tensor("empty", DType::kFloat32, {0, 7}, 10));
  d.sections["strategy"] = std::string("shard\0state", 11);
  d.sections["rng"] = RandomBytes(1000, 11);
  auto store = OpenStore();
  ASSERT_TRUE(store->Save(d).ok());

  CheckpointData got;
  ASSERT_TRUE(store->Load(1200, &got).ok());
  ExpectSameData(got, d);
  EXPECT_GT(got.wall_time, 1700000000);

  store.reset();  // from disk, not the memtable
  store = OpenStore();
  CheckpointData again;
  ASSERT_TRUE(store->Load(1200, &again).ok());
  ExpectSameData(again, d);

  CheckpointManifest m;
  ASSERT_TRUE(store->ReadManifest(1200, &m).ok());
  EXPECT_EQ(m.job_name(), "job_a");
  EXPECT_EQ(m.config_digest(), "d1");
  EXPECT_EQ(m.format_version(), 1u);
  ASSERT_EQ(m.tensors_size(), static_cast<int>(d.tensors.size()));
  const TensorEntry& big = m.tensors(2);
  EXPECT_EQ(big.name(), "layers.4.fc.weight");
  EXPECT_EQ(big.byte_size(), 5u * (1 << 20) + 12);
  EXPECT_EQ(big.chunk_count(), 2u);
  EXPECT_EQ(big.crc32c(), crc32c::Value(d.tensors[2].bytes));
  EXPECT_EQ(m.tensors(10).chunk_count(), 0u);  // "empty"
  EXPECT_EQ(m.sections_size(), 3);
  EXPECT_TRUE(store->Verify(1200).ok());
}

TEST_P(CheckpointStoreTest, SmallChunksRoundTrip) {
  StoreOptions o = Options();
  o.chunk_bytes = 1000;
  auto store = OpenStore(o);
  CheckpointData d = SmallCheckpoint(5);  // fc.weight: 2048 bytes, 3 chunks
  ASSERT_TRUE(store->Save(d).ok());
  CheckpointManifest m;
  ASSERT_TRUE(store->ReadManifest(5, &m).ok());
  EXPECT_EQ(m.tensors(0).chunk_count(), 3u);
  CheckpointData got;
  ASSERT_TRUE(store->Load(5, &got).ok());
  ExpectSameData(got, d);
}

TEST_P(CheckpointStoreTest, CheckpointsWithoutTensorsOrSectionsRoundTrip) {
  auto store = OpenStore();
  CheckpointData only_sections = SmallCheckpoint(1);
  only_sections.tensors.clear();
  CheckpointData empty = SmallCheckpoint(2);
  empty.tensors.clear();
  empty.sections.clear();
  ASSERT_TRUE(store->Save(only_sections).ok());
  ASSERT_TRUE(store->Save(empty).ok());
  CheckpointData got;
  ASSERT_TRUE(store->Load(1, &got).ok());
  ExpectSameData(got, only_sections);
  ASSERT_TRUE(store->Load(2, &got).ok());
  ExpectSameData(got, empty);
}

TEST_P(CheckpointStoreTest, ListAndLatestStepDescribeTheCheckpointsNewestFirst) {
  auto store = OpenStore();
  int64_t latest = -1;
  EXPECT_EQ(store->LatestStep(&latest).code(), Status::Code::kNotFound);
  CheckpointData none;
  EXPECT_EQ(store->LoadLatestGood(&none, nullptr).code(), Status::Code::kNotFound);
  std::vector<CheckpointInfo> infos;
  ASSERT_TRUE(store->List(&infos).ok());
  EXPECT_TRUE(infos.empty());

  for (int64_t step : {100, 200, 300}) ASSERT_TRUE(store->Save(SmallCheckpoint(step)).ok());
  ASSERT_TRUE(store->LatestStep(&latest).ok());
  EXPECT_EQ(latest, 300);
  ASSERT_TRUE(store->List(&infos).ok());
  ASSERT_EQ(infos.size(), 3u);
  EXPECT_EQ(infos[0].step, 300);
  EXPECT_EQ(infos[1].step, 200);
  EXPECT_EQ(infos[2].step, 100);
  EXPECT_TRUE(infos[0].latest);
  EXPECT_FALSE(infos[1].latest);
  EXPECT_EQ(infos[0].epoch, 3);
  EXPECT_EQ(infos[0].mode, "sync");
  EXPECT_EQ(infos[0].world_size, 4);
  EXPECT_EQ(infos[0].tensor_count, 2);
  EXPECT_EQ(infos[0].section_count, 1);
  EXPECT_EQ(infos[0].bytes, SmallCheckpoint(300).ByteSize());
  EXPECT_TRUE(infos[0].error.empty());
  EXPECT_GT(infos[0].wall_time, 0);
}

TEST_P(CheckpointStoreTest, KeepLastKeepsTheNewestCheckpointsAndSurvivesReopen) {
  StoreOptions o = Options();
  o.keep_last = 2;
  {
    auto store = OpenStore(o);
    for (int64_t step = 1; step <= 5; ++step) ASSERT_TRUE(store->Save(SmallCheckpoint(step * 10)).ok());
    EXPECT_THAT(Steps(*store), ElementsAre(50, 40));
    CheckpointData d;
    EXPECT_EQ(store->Load(30, &d).code(), Status::Code::kNotFound);
  }
  auto store = OpenStore(o);
  EXPECT_THAT(Steps(*store), ElementsAre(50, 40));
  ASSERT_TRUE(store->Save(SmallCheckpoint(60)).ok());
  EXPECT_THAT(Steps(*store), ElementsAre(60, 50));
  CheckpointData d;
  ASSERT_TRUE(store->Load(50, &d).ok());
  ExpectSameData(d, SmallCheckpoint(50));
}

uint64_t TableFileBytes(const std::string& dir) {
  uint64_t n = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() == ".sst") n += e.file_size();
  }
  return n;
}

TEST_P(CheckpointStoreTest, KeepLastGivesTheDiskSpaceBack) {
  if (GetParam() == WritePath::kWriteBatch) {
    GTEST_SKIP() << "the WriteBatch path's table files are freed by compaction, later";
  }
  StoreOptions o = Options();
  o.keep_last = 2;
  auto store = OpenStore(o);
  for (int64_t step = 1; step <= 6; ++step) {
    CheckpointData d = SmallCheckpoint(step);
    d.tensors.push_back(Tensor("big", DType::kUInt8, {1 << 20}, step));
    ASSERT_TRUE(store->Save(d).ok());
    if (step == 4) {
      // A resumed run that fell back saves a lower step (kept as `latest`).
      ASSERT_TRUE(store->Save(SmallCheckpoint(2)).ok());
    }
  }
  EXPECT_THAT(Steps(*store), ElementsAre(6, 5));
  store.reset();  // waits for RocksDB's background thread that unlinks them
  const uint64_t bytes = TableFileBytes(o.path);
  EXPECT_GT(bytes, 2u << 20);
  EXPECT_LT(bytes, 3u << 20) << "table files of deleted checkpoints are still there";
}

TEST_P(CheckpointStoreTest, KeepLastNeverDeletesTheLatestCheckpoint) {
  StoreOptions o = Options();
  o.keep_last = 1;
  auto store = OpenStore(o);
  ASSERT_TRUE(store->Save(SmallCheckpoint(500)).ok());
  // A resumed run that fell back to an older step saves a lower step: it
  // becomes `latest` and is kept although 500 is higher.
  ASSERT_TRUE(store->Save(SmallCheckpoint(300)).ok());
  EXPECT_THAT(Steps(*store), ElementsAre(500, 300));
  int64_t latest = 0;
  ASSERT_TRUE(store->LatestStep(&latest).ok());
  EXPECT_EQ(latest, 300);
}

TEST_P(CheckpointStoreTest, KeepLastZeroKeepsEveryCheckpoint) {
  StoreOptions o = Options();
  o.keep_last = 0;
  auto store = OpenStore(o);
  for (int64_t step = 1; step <= 5; ++step) ASSERT_TRUE(store->Save(SmallCheckpoint(step)).ok());
  EXPECT_THAT(Steps(*store), ElementsAre(5, 4, 3, 2, 1));
}

TEST_P(CheckpointStoreTest, SavingAnExistingStepReplacesItWhole) {
  StoreOptions o = Options();
  o.chunk_bytes = 1024;
  auto store = OpenStore(o);
  CheckpointData first = SmallCheckpoint(7);
  first.tensors.push_back(Tensor("extra", DType::kUInt8, {10000}, 1));  // 10 chunks
  ASSERT_TRUE(store->Save(first).ok());
  const CheckpointData second = SmallCheckpoint(7);  // no "extra"
  ASSERT_TRUE(store->Save(second).ok());
  CheckpointData got;
  ASSERT_TRUE(store->Load(7, &got).ok());
  ExpectSameData(got, second);
  EXPECT_THAT(Steps(*store), ElementsAre(7));
  store.reset();
  // No chunk of the first copy is left behind.
  RawDb raw(Options().path, /*read_only=*/true);
  std::string v;
  EXPECT_TRUE(raw.db->Get(rocksdb::ReadOptions(), raw.checkpoints(), Key(7, "t/00000002/00000000"), &v).IsNotFound());
  EXPECT_TRUE(raw.db->Get(rocksdb::ReadOptions(), raw.checkpoints(), Key(7, "t/00000000/00000000"), &v).ok());
}

// ---- ownership ---------------------------------------------------------------------------

TEST_P(CheckpointStoreTest, StoreOfAnotherJobIsRefusedWithBothNamesUnlessForced) {
  {
    auto store = OpenStore();
    ASSERT_TRUE(store->Save(SmallCheckpoint(1)).ok());
  }
  StoreOptions other = Options();
  other.job_name = "job_b";
  other.config_digest = "d9";
  std::unique_ptr<CheckpointStore> store;
  Status st = CheckpointStore::Open(other, &store);
  ASSERT_EQ(st.code(), Status::Code::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr("belongs to job 'job_a' (config digest 'd1')"));
  EXPECT_THAT(st.message(), HasSubstr("this is job 'job_b' (config digest 'd9')"));
  EXPECT_THAT(st.message(), HasSubstr("force"));

  other.force = true;
  store = OpenStore(other);
  ASSERT_NE(store, nullptr);
  CheckpointData d;
  ASSERT_TRUE(store->Load(1, &d).ok());
  EXPECT_EQ(d.job_name, "job_a");
  // The forced job's first save makes it the owner.
  ASSERT_TRUE(store->Save(SmallCheckpoint(2, "job_b", "d9")).ok());
  EXPECT_EQ(store->owner_job_name(), "job_b");
  store.reset();
  other.force = false;
  store = OpenStore(other);
  ASSERT_NE(store, nullptr);
  store.reset();
  st = CheckpointStore::Open(Options(), &store);
  EXPECT_EQ(st.code(), Status::Code::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr("belongs to job 'job_b'"));
}

TEST_P(CheckpointStoreTest, ChangedConfigDigestIsRefusedUnlessForced) {
  {
    auto store = OpenStore();
    ASSERT_TRUE(store->Save(SmallCheckpoint(1)).ok());
  }
  StoreOptions o = Options();
  o.config_digest = "d2";
  std::unique_ptr<CheckpointStore> store;
  Status st = CheckpointStore::Open(o, &store);
  ASSERT_EQ(st.code(), Status::Code::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr("config digest 'd1'"));
  EXPECT_THAT(st.message(), HasSubstr("config digest 'd2'"));
  EXPECT_THAT(st.message(), HasSubstr("configuration changed"));

  // Opened without expectations (as `dtrain ckpt` does), a save of another
  // job is still refused.
  StoreOptions any = Options();
  any.job_name.clear();
  any.config_digest.clear();
  store = OpenStore(any);
  EXPECT_EQ(store->owner_job_name(), "job_a");
  EXPECT_EQ(store->owner_config_digest(), "d1");
  st = store->Save(SmallCheckpoint(2, "job_a", "d2"));
  EXPECT_EQ(st.code(), Status::Code::kFailedPrecondition);
  EXPECT_THAT(Steps(*store), ElementsAre(1));
}

TEST_P(CheckpointStoreTest, SecondWriterIsRefusedWhileReadOnlyOpenWorks) {
  auto writer = OpenStore();
  ASSERT_TRUE(writer->Save(SmallCheckpoint(1)).ok());
  std::unique_ptr<CheckpointStore> second;
  Status st = CheckpointStore::Open(Options(), &second);
  EXPECT_EQ(st.code(), Status::Code::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr("open for writing in another process"));

  StoreOptions ro = Options();
  ro.read_only = true;
  auto reader = OpenStore(ro);
  ASSERT_NE(reader, nullptr);
  EXPECT_THAT(Steps(*reader), ElementsAre(1));
  EXPECT_EQ(reader->Save(SmallCheckpoint(2)).code(), Status::Code::kFailedPrecondition);
}

TEST_P(CheckpointStoreTest, MissingStoreIsNotFoundWithoutCreate) {
  StoreOptions o = Options();
  o.create_if_missing = false;
  std::unique_ptr<CheckpointStore> store;
  Status st = CheckpointStore::Open(o, &store);
  EXPECT_EQ(st.code(), Status::Code::kNotFound);
  EXPECT_THAT(st.message(), HasSubstr(o.path));
  o.create_if_missing = true;
  o.read_only = true;
  EXPECT_EQ(CheckpointStore::Open(o, &store).code(), Status::Code::kNotFound);
  o.read_only = false;
  o.chunk_bytes = 0;
  EXPECT_EQ(CheckpointStore::Open(o, &store).code(), Status::Code::kInvalidArgument);
}

// ---- bad input -----------------------------------------------------------------------------

TEST_P(CheckpointStoreTest, BadRecordsAreRejectedBeforeAnythingIsWritten) {
  auto store = OpenStore();
  struct Case {
    std::function<void(CheckpointData*)> spoil;
    std::string message;
  };
  const std::vector<Case> cases = {
      {[](CheckpointData* d) { d->tensors[0].bytes.pop_back(); },
       "checkpoint 7: tensor 'fc.weight' (float32, shape [16, 32]) has 2047 bytes, but shape x element size = "
       "2048 bytes"},
      {[](CheckpointData* d) { d->tensors[1].dtype = DType::kFloat64; },
       "tensor 'fc.bias' (float64, shape [16]) has 64 bytes, but shape x element size = 128 bytes"},
      {[](CheckpointData* d) { d->tensors[1].name = "fc.weight"; }, "tensor 'fc.weight' appears twice"},
      {[](CheckpointData* d) { d->tensors[1].shape = {-16}; }, "tensor 'fc.bias' has an invalid shape [-16]"},
      {[](CheckpointData* d) { d->tensors[1].dtype = static_cast<DType>(42); },
       "tensor 'fc.bias' has an unknown dtype (42)"},
      {[](CheckpointData* d) { d->tensors[0].name.clear(); }, "tensor #0 has no name"},
      {[](CheckpointData* d) { d->job_name.clear(); }, "job_name is empty"},
      {[](CheckpointData* d) { d->step = -1; }, "step must be >= 0"},
      {[](CheckpointData* d) { d->sections[""] = "x"; }, "a section has an empty name"},
  };
  for (const Case& c : cases) {
    CheckpointData d = SmallCheckpoint(7);
    c.spoil(&d);
    Status st = store->Save(d);
    EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << c.message;
    EXPECT_THAT(st.message(), HasSubstr(c.message));
  }
  EXPECT_TRUE(Steps(*store).empty());
  int64_t latest = 0;
  EXPECT_EQ(store->LatestStep(&latest).code(), Status::Code::kNotFound);
}

// ---- corruption -------------------------------------------------------------------------------

TEST_P(CheckpointStoreTest, CorruptTensorIsReportedAndLoadFallsBack) {
  StoreOptions o = Options();
  o.chunk_bytes = 512;
  {
    auto store = OpenStore(o);
    ASSERT_TRUE(store->Save(SmallCheckpoint(1100)).ok());
    ASSERT_TRUE(store->Save(SmallCheckpoint(1200)).ok());
  }
  // Flip one bit of chunk 2 of fc.weight (tensor 0) in checkpoint 1200.
  RewriteValue(o.path, Key(1200, "t/00000000/00000002"), [](std::string* v) { (*v)[17] ^= 0x10; });

  auto store = OpenStore(o);
  CheckpointData d;
  Status st = store->Load(1200, &d);
  ASSERT_EQ(st.code(), Status::Code::kCorruption);
  EXPECT_THAT(st.message(), HasSubstr("checkpoint 1200: tensor 'fc.weight' fails its CRC32C check (stored 0x"));
  EXPECT_THAT(st.message(), HasSubstr(", computed 0x"));
  EXPECT_EQ(store->Verify(1200).code(), Status::Code::kCorruption);
  EXPECT_TRUE(store->Verify(1100).ok());

  std::vector<std::string> warnings;
  ASSERT_TRUE(store->LoadLatestGood(&d, &warnings).ok());
  ExpectSameData(d, SmallCheckpoint(1100));
  ASSERT_EQ(warnings.size(), 2u);
  EXPECT_THAT(warnings[0], HasSubstr("skipping checkpoint 1200: checkpoint 1200: tensor 'fc.weight' fails its CRC32C"));
  EXPECT_THAT(warnings[1], HasSubstr("loaded checkpoint 1100 instead of the latest, 1200"));
}

TEST_P(CheckpointStoreTest, TruncatedChunkAndCorruptSectionAreReported) {
  StoreOptions o = Options();
  o.chunk_bytes = 512;
  {
    auto store = OpenStore(o);
    ASSERT_TRUE(store->Save(SmallCheckpoint(1)).ok());
    ASSERT_TRUE(store->Save(SmallCheckpoint(2)).ok());
  }
  RewriteValue(o.path, Key(1, "t/00000001/00000000"), [](std::string* v) { v->resize(10); });
  RewriteValue(o.path, Key(2, "s/trainer"), [](std::string* v) { (*v)[0] = 'X'; });
  auto store = OpenStore(o);
  CheckpointData d;
  Status st = store->Load(1, &d);
  EXPECT_EQ(st.code(), Status::Code::kCorruption);
  EXPECT_THAT(st.message(), HasSubstr("checkpoint 1: tensor 'fc.bias' chunk 0 of 1 has 10 bytes, expected 64"));
  st = store->Load(2, &d);
  EXPECT_EQ(st.code(), Status::Code::kCorruption);
  EXPECT_THAT(st.message(), HasSubstr("checkpoint 2: section 'trainer' fails its CRC32C check"));
  std::vector<std::string> warnings;
  st = store->LoadLatestGood(&d, &warnings);
  EXPECT_EQ(st.code(), Status::Code::kCorruption);
  EXPECT_THAT(st.message(), HasSubstr("no intact checkpoint"));
  EXPECT_EQ(warnings.size(), 2u);
}

TEST_P(CheckpointStoreTest, CorruptManifestIsReportedByLoadAndList) {
  {
    auto store = OpenStore();
    ASSERT_TRUE(store->Save(SmallCheckpoint(1)).ok());
    ASSERT_TRUE(store->Save(SmallCheckpoint(2)).ok());
  }
  RewriteValue(Options().path, Key(2, "manifest"), [](std::string* v) { (*v)[v->size() / 2] ^= 1; });
  auto store = OpenStore();
  CheckpointManifest m;
  Status st = store->ReadManifest(2, &m);
  EXPECT_EQ(st.code(), Status::Code::kCorruption);
  EXPECT_THAT(st.message(), HasSubstr("checkpoint 2: manifest fails its CRC32C check"));
  std::vector<CheckpointInfo> infos;
  ASSERT_TRUE(store->List(&infos).ok());
  ASSERT_EQ(infos.size(), 2u);
  EXPECT_THAT(infos[0].error, HasSubstr("manifest fails its CRC32C check"));
  EXPECT_TRUE(infos[1].error.empty());
  CheckpointData d;
  std::vector<std::string> warnings;
  ASSERT_TRUE(store->LoadLatestGood(&d, &warnings).ok());
  EXPECT_EQ(d.step, 1);
  EXPECT_THAT(warnings[0], HasSubstr("skipping checkpoint 2"));
}

TEST_P(CheckpointStoreTest, BitRotInATableFileIsReportedAndLoadFallsBack) {
  {
    auto store = OpenStore();
    CheckpointData a = SmallCheckpoint(1), b = SmallCheckpoint(2);
    a.tensors.push_back(Tensor("big", DType::kFloat32, {100000}, 1));
    b.tensors.push_back(Tensor("big", DType::kFloat32, {100000}, 2));
    ASSERT_TRUE(store->Save(a).ok());
    ASSERT_TRUE(store->Flush().ok());
    ASSERT_TRUE(store->Save(b).ok());
    ASSERT_TRUE(store->Flush().ok());
  }
  // The table files holding the two checkpoints (RocksDB numbers files in
  // creation order; the others are a few KiB).
  std::vector<std::string> tables;
  for (const auto& e : fs::directory_iterator(Options().path)) {
    if (e.path().extension() == ".sst" && e.file_size() > 300000) tables.push_back(e.path().string());
  }
  ASSERT_EQ(tables.size(), 2u);
  std::sort(tables.begin(), tables.end());
  {
    const auto middle = static_cast<std::streamoff>(fs::file_size(tables.back()) / 2);
    std::fstream f(tables.back(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(middle);
    char c = 0;
    f.read(&c, 1);
    c ^= 0x40;
    f.seekp(middle);
    f.write(&c, 1);
  }
  auto store = OpenStore();
  CheckpointData d;
  Status st = store->Load(2, &d);
  EXPECT_EQ(st.code(), Status::Code::kCorruption);
  // The damaged block holds several small values and the big chunk; the
  // first tensor read from it is named.
  EXPECT_THAT(st.message(), HasSubstr("checkpoint 2: tensor '"));
  EXPECT_THAT(st.message(), HasSubstr("block checksum mismatch"));
  std::vector<CheckpointInfo> infos;
  ASSERT_TRUE(store->List(&infos).ok());  // manifests are elsewhere: still listed
  EXPECT_EQ(infos.size(), 2u);
  std::vector<std::string> warnings;
  st = store->LoadLatestGood(&d, &warnings);
  ASSERT_TRUE(st.ok()) << st << " " << ::testing::PrintToString(warnings);
  EXPECT_EQ(d.step, 1);
  ASSERT_EQ(warnings.size(), 2u);
  EXPECT_THAT(warnings[0], HasSubstr("skipping checkpoint 2: checkpoint 2: tensor '"));
}

// ---- atomicity under injected faults --------------------------------------------------------

TEST_P(CheckpointStoreTest, FailureBeforeCommitLeavesTheStoreAsItWas) {
  StoreOptions o = Options();
  std::atomic<bool> fail{false};
  o.fault_hook = [&](const char* point) {
    if (fail && std::string(point) == fault_point::kBeforeCommit) return Status::IOError("injected write failure");
    return Status::OK();
  };
  {
    auto store = OpenStore(o);
    ASSERT_TRUE(store->Save(SmallCheckpoint(1)).ok());
    fail = true;
    Status st = store->Save(SmallCheckpoint(2));
    EXPECT_EQ(st.code(), Status::Code::kIOError);
    EXPECT_THAT(st.message(), HasSubstr("injected write failure"));
    int64_t latest = 0;
    ASSERT_TRUE(store->LatestStep(&latest).ok());
    EXPECT_EQ(latest, 1);
    CheckpointData d;
    EXPECT_EQ(store->Load(2, &d).code(), Status::Code::kNotFound);
  }
  auto store = OpenStore();
  EXPECT_THAT(Steps(*store), ElementsAre(1));
  CheckpointData d;
  std::vector<std::string> warnings;
  ASSERT_TRUE(store->LoadLatestGood(&d, &warnings).ok());
  ExpectSameData(d, SmallCheckpoint(1));
  EXPECT_TRUE(warnings.empty());
}

TEST_P(CheckpointStoreTest, FailureAtGcLeavesTheNewCheckpointCompleteAndGcRetries) {
  StoreOptions o = Options();
  o.keep_last = 2;
  std::atomic<bool> fail{false};
  std::vector<std::string> points;
  o.fault_hook = [&](const char* point) {
    points.push_back(point);
    if (fail && std::string(point) == fault_point::kBeforeGc) return Status::IOError("injected GC failure");
    return Status::OK();
  };
  auto store = OpenStore(o);
  ASSERT_TRUE(store->Save(SmallCheckpoint(1)).ok());
  EXPECT_THAT(points, ElementsAre(fault_point::kBeforeCommit, fault_point::kBeforeGc, fault_point::kAfterGc));
  ASSERT_TRUE(store->Save(SmallCheckpoint(2)).ok());
  fail = true;
  ASSERT_TRUE(store->Save(SmallCheckpoint(3)).ok());  // committed; GC skipped
  EXPECT_THAT(Steps(*store), ElementsAre(3, 2, 1));
  int64_t latest = 0;
  ASSERT_TRUE(store->LatestStep(&latest).ok());
  EXPECT_EQ(latest, 3);
  CheckpointData d;
  ASSERT_TRUE(store->Load(3, &d).ok());
  ExpectSameData(d, SmallCheckpoint(3));
  fail = false;
  ASSERT_TRUE(store->Save(SmallCheckpoint(4)).ok());
  EXPECT_THAT(Steps(*store), ElementsAre(4, 3));
}

// ---- real crashes ----------------------------------------------------------------------------

using testing_crash::MakeCrashCheckpoint;

// checkpoint_crash_writer running as a child, its stdout on a pipe.
class CrashWriter {
 public:
  explicit CrashWriter(const std::vector<std::string>& args) {
    const std::string exe = std::string(DTRAIN_BINARY_DIR) + "/tests/checkpoint_crash_writer";
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) std::abort();
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fds[1], STDOUT_FILENO);
    std::vector<std::string> all = {exe};
    all.insert(all.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& a : all) argv.push_back(a.data());
    argv.push_back(nullptr);
    spawned_ = posix_spawn(&pid_, exe.c_str(), &fa, nullptr, argv.data(), environ) == 0;
    posix_spawn_file_actions_destroy(&fa);
    close(fds[1]);
    fd_ = fds[0];
  }
  ~CrashWriter() {
    if (pid_ > 0 && !reaped_) {
      kill(pid_, SIGKILL);
      Wait();
    }
    close(fd_);
  }
  bool spawned() const { return spawned_; }

  // Reads "saved <step>" lines until one arrives (true) or `timeout` passes
  // or the pipe ends (false). Updates last_saved().
  bool WaitForSave(std::chrono::milliseconds timeout) {
    const int64_t before = saves_;
    const auto deadline = Clock::now() + timeout;
    while (saves_ == before) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0 || !ReadSome(static_cast<int>(left))) return false;
    }
    return true;
  }
  // Reads everything left on the pipe (after the child is gone).
  void Drain() {
    while (ReadSome(1000)) {
    }
  }
  void Kill() { kill(pid_, SIGKILL); }
  // Waits for the child; returns its wait status.
  int Wait() {
    int status = 0;
    waitpid(pid_, &status, 0);
    reaped_ = true;
    return status;
  }
  int64_t last_saved() const { return last_saved_; }
  int64_t saves() const { return saves_; }

 private:
  bool ReadSome(int timeout_ms) {
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return false;
    char buf[256];
    const ssize_t n = read(fd_, buf, sizeof(buf));
    if (n <= 0) return false;
    line_.append(buf, static_cast<size_t>(n));
    for (size_t nl; (nl = line_.find('\n')) != std::string::npos; line_.erase(0, nl + 1)) {
      long long step = 0;
      if (std::sscanf(line_.c_str(), "saved %lld", &step) == 1) {
        last_saved_ = step;
        ++saves_;
      }
    }
    return true;
  }

  pid_t pid_ = -1;
  int fd_ = -1;
  bool spawned_ = false;
  bool reaped_ = false;
  std::string line_;
  int64_t last_saved_ = -1;
  int64_t saves_ = 0;
};

class CheckpointCrashTest : public StoreTestBase {};

StoreOptions CrashStoreOptions(const std::string& path) {
  StoreOptions o;
  o.path = path;
  o.job_name = "crash_test";
  o.config_digest = "digest-1";
  o.keep_last = 3;
  return o;
}

// Opens the store a crashed writer left, checks that `latest` is at least
// `min_latest`, that LoadLatestGood returns it intact without warnings, and
// that every listed checkpoint verifies. Returns the latest step.
int64_t CheckStoreAfterCrash(const std::string& path, int64_t min_latest, int mb) {
  std::unique_ptr<CheckpointStore> store;
  Status st = CheckpointStore::Open(CrashStoreOptions(path), &store);
  EXPECT_TRUE(st.ok()) << st;
  if (!st.ok()) return -1;
  int64_t latest = -1;
  st = store->LatestStep(&latest);
  if (min_latest < 0 && st.code() == Status::Code::kNotFound) return -1;
  EXPECT_TRUE(st.ok()) << st;
  EXPECT_GE(latest, min_latest) << "a save the writer reported as committed is gone";
  CheckpointData d;
  std::vector<std::string> warnings;
  st = store->LoadLatestGood(&d, &warnings);
  EXPECT_TRUE(st.ok()) << st;
  EXPECT_TRUE(warnings.empty()) << warnings.front();
  EXPECT_EQ(d.step, latest);
  ExpectSameData(d, MakeCrashCheckpoint(latest, mb));
  std::vector<CheckpointInfo> infos;
  EXPECT_TRUE(store->List(&infos).ok());
  for (const CheckpointInfo& i : infos) EXPECT_TRUE(store->Verify(i.step).ok()) << "checkpoint " << i.step;
  return latest;
}

TEST_F(CheckpointCrashTest, ProcessKilledAtEachFaultPointLeavesAConsistentStore) {
  struct Case {
    const char* point;
    std::vector<int64_t> steps_after;  // the writer saved 1..4 (keep_last 3), then dies saving 5
    int64_t latest;
  };
  const Case cases[] = {
      {fault_point::kBeforeCommit, {4, 3, 2}, 4},
      {fault_point::kBeforeGc, {5, 4, 3, 2}, 5},
      {fault_point::kAfterGc, {5, 4, 3}, 5},
  };
  for (const char* path_flag : {"", "--write-batch"}) {
    for (const Case& c : cases) {
      SCOPED_TRACE(std::string(c.point) + " " + path_flag);
      TempDir dir;
      const std::string path = dir.path() + "/store";
      auto args = [&](std::vector<std::string> a) {
        a.insert(a.begin(), path);
        if (*path_flag) a.push_back(path_flag);
        return a;
      };
      {
        CrashWriter w(args({"--mb", "1", "--count", "4"}));
        ASSERT_TRUE(w.spawned());
        w.Drain();
        const int status = w.Wait();
        ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        ASSERT_EQ(w.last_saved(), 4);
      }
      {
        CrashWriter w(args({"--mb", "1", "--die-at", c.point, "--die-on-save", "1"}));
        ASSERT_TRUE(w.spawned());
        w.Drain();
        const int status = w.Wait();
        ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
        EXPECT_EQ(w.saves(), 0);
      }
      EXPECT_EQ(CheckStoreAfterCrash(path, c.latest, 1), c.latest);
      std::unique_ptr<CheckpointStore> store;
      ASSERT_TRUE(CheckpointStore::Open(CrashStoreOptions(path), &store).ok());
      EXPECT_EQ(Steps(*store), c.steps_after);
      // The table files of the save that died are gone.
      EXPECT_FALSE(fs::exists(path + "/ingest"));
    }
  }
}

TEST_F(CheckpointCrashTest, SigkillAtRandomMomentsAlwaysLeavesAnIntactLatestCheckpoint) {
  const int kMb = 20;
  const std::string path = dir_.path() + "/store";
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  int64_t committed = -1;  // highest step a writer reported as saved
  for (int round = 0; round < 5; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    CrashWriter w({path, "--mb", std::to_string(kMb)});
    ASSERT_TRUE(w.spawned());
    ASSERT_TRUE(w.WaitForSave(std::chrono::seconds(60))) << "the writer saved nothing";
    // Somewhere in the next save or two: generating data, building the batch,
    // writing the log, GC.
    std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(0, 400)(rng)));
    w.Kill();
    const int status = w.Wait();
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    w.Drain();
    committed = std::max(committed, w.last_saved());
    const int64_t latest = CheckStoreAfterCrash(path, committed, kMb);
    ASSERT_FALSE(HasFailure());
    EXPECT_LE(latest, committed + 1);  // at most the save in flight when killed
    committed = latest;
  }
}

class CheckpointAsyncWriterTest : public StoreTestBase {};

// ---- async writer ------------------------------------------------------------------------------

TEST_F(CheckpointAsyncWriterTest, CoalescesToTheNewestSnapshotWhileASaveIsInFlight) {
  std::mutex mu;
  std::condition_variable cv;
  bool entered = false, release = false;
  StoreOptions o = Options();
  o.fault_hook = [&](const char* point) {
    if (std::string(point) != fault_point::kBeforeCommit) return Status::OK();
    std::unique_lock<std::mutex> lock(mu);
    if (!entered) {  // hold the first save until the test has submitted the rest
      entered = true;
      cv.notify_all();
      cv.wait(lock, [&] { return release; });
    }
    return Status::OK();
  };
  auto store = OpenStore(o);
  {
    AsyncCheckpointWriter writer(store.get());
    writer.Submit(SmallCheckpoint(1));
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return entered; });
    }
    for (int64_t step = 2; step <= 5; ++step) writer.Submit(SmallCheckpoint(step));
    AsyncWriterStats s = writer.stats();
    EXPECT_EQ(s.submitted, 5);
    EXPECT_EQ(s.coalesced, 3);  // 2, 3, 4 replaced while 1 was in flight
    EXPECT_EQ(s.written, 0);
    {
      std::lock_guard<std::mutex> lock(mu);
      release = true;
    }
    cv.notify_all();
    ASSERT_TRUE(writer.Flush().ok());
    s = writer.stats();
    EXPECT_EQ(s.written, 2);
    EXPECT_EQ(s.failed, 0);
    EXPECT_EQ(s.last_written_step, 5);
    EXPECT_TRUE(writer.last_error().ok());
  }
  EXPECT_THAT(Steps(*store), ElementsAre(5, 1));
  int64_t latest = 0;
  ASSERT_TRUE(store->LatestStep(&latest).ok());
  EXPECT_EQ(latest, 5);
  CheckpointData d;
  ASSERT_TRUE(store->Load(5, &d).ok());
  ExpectSameData(d, SmallCheckpoint(5));
}

TEST_F(CheckpointAsyncWriterTest, FlushReturnsTheFirstSaveError) {
  std::atomic<bool> fail{true};
  StoreOptions o = Options();
  o.fault_hook = [&](const char* point) {
    if (fail && std::string(point) == fault_point::kBeforeCommit) return Status::IOError("injected: disk full");
    return Status::OK();
  };
  auto store = OpenStore(o);
  AsyncCheckpointWriter writer(store.get());
  writer.Submit(SmallCheckpoint(1));
  Status st = writer.Flush();
  EXPECT_EQ(st.code(), Status::Code::kIOError);
  EXPECT_THAT(st.message(), HasSubstr("injected: disk full"));
  EXPECT_EQ(writer.last_error().code(), Status::Code::kIOError);
  EXPECT_TRUE(writer.Flush().ok());  // reported once
  EXPECT_EQ(writer.last_error().code(), Status::Code::kIOError);

  fail = false;
  writer.Submit(SmallCheckpoint(2));
  EXPECT_TRUE(writer.Flush().ok());
  const AsyncWriterStats s = writer.stats();
  EXPECT_EQ(s.failed, 1);
  EXPECT_EQ(s.written, 1);
  EXPECT_EQ(s.last_written_step, 2);
  EXPECT_THAT(Steps(*store), ElementsAre(2));
}

TEST_F(CheckpointAsyncWriterTest, DestructorWritesWhatWasSubmitted) {
  auto store = OpenStore();
  {
    AsyncCheckpointWriter writer(store.get());
    writer.Submit(SmallCheckpoint(10));
  }
  CheckpointData d;
  ASSERT_TRUE(store->Load(10, &d).ok());
  ExpectSameData(d, SmallCheckpoint(10));
}

}  // namespace
}  // namespace dtrain
