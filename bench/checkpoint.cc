// bench/checkpoint: checkpoint store Save and restore bandwidth against plain
// sequential file writes to the same filesystem, measured alternately in one
// run (the machine is shared and noisy, so figures taken side by side count).
// Before each timed write the page cache is written back (sync) so that no
// measurement pays for the one before.
//
// The model: --tensors float32 tensors of random bytes (incompressible, like
// trained weights) with sizes spread over two orders of magnitude, --mb MiB in
// all. Each repetition measures
//   plain    write(2) of every tensor into one new file, then fsync
//   save     CheckpointStore::Save: CRC32C, table files (or batch), fsyncs,
//            commit, GC; keep_last 3, so from the 4th rep on GC deletes one
//   flush    CheckpointStore::Flush after the save: for the WriteBatch path the
//            memtable written to a table file, which RocksDB otherwise does
//            in the background after Save returns (off the writer's path);
//            nothing to do for the ingestion path
//   load     Load of that checkpoint with CRC checks right after the save
//            (the ingestion path has dropped its pages from the page cache,
//            the WriteBatch path reads its fresh table file from it)
//   restore  close, drop the store's pages from the page cache
//            (posix_fadvise DONTNEED), Open + Load: a resume after a restart
// for each write path (table-file ingestion, the default; synced WriteBatch).
//
// CPU seconds (user + system of the writing thread) are reported next to the
// wall times: on a machine whose cores are busy, the store's extra CPU work
// (CRC32C, RocksDB's copy into its block buffer, block checksums) shows in
// its wall time.
//
// Goal (issue "Checkpoint store"): save / plain >= 0.70.
//
//   build/bin/bench_checkpoint [--mb 128] [--tensors 60] [--reps 5] [--dir /tmp] [--out FILE]
// Run it from the repository root: the JSON goes to bench/results/, and the
// table says whether --dir is on the same filesystem as the working directory
// (on the project machine /tmp and the repository share one disk).
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/common/checkpoint_store.h"
#include "dtrain/common/crc32c.h"
#include "dtrain/common/logging.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// CPU seconds (user + system) this thread has used.
double ThreadCpuSeconds() {
  rusage u;
  ::getrusage(RUSAGE_THREAD, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "bench_checkpoint: %s\n", what.c_str());
  std::exit(1);
}

void Check(const dtrain::Status& s) {
  if (!s.ok()) Die(s.ToString());
}

// `n` float32 tensors of `total` bytes; sizes log-uniform between 1/100 and
// 1 of the largest, scaled to the total (like the layers of a network).
dtrain::CheckpointData MakeModel(uint64_t total, int n) {
  std::mt19937_64 rng(42);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<double> w(n);
  double sum = 0;
  for (double& x : w) sum += (x = std::pow(100.0, u(rng)));
  dtrain::CheckpointData d;
  d.job_name = "bench_checkpoint";
  d.config_digest = "bench";
  d.mode = "local";
  uint64_t left = total / 4;
  for (int i = 0; i < n; ++i) {
    const uint64_t floats = i + 1 == n ? left : std::min<uint64_t>(left, static_cast<uint64_t>(total / 4 * w[i] / sum));
    left -= floats;
    dtrain::TensorRecord t;
    t.name = "layers." + std::to_string(i) + ".weight";
    t.shape = {static_cast<int64_t>(floats)};
    t.bytes.resize(floats * 4);
    for (size_t off = 0; off + 8 <= t.bytes.size(); off += 8) {
      const uint64_t v = rng();
      std::memcpy(&t.bytes[off], &v, 8);
    }
    d.tensors.push_back(std::move(t));
  }
  d.sections["trainer"] = std::string(4096, 't');
  return d;
}

// Lets each measurement start with nothing dirty in the page cache: what an
// earlier one left behind would otherwise be written back during the next.
void Settle() {
  ::sync();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
}

// Returns the wall seconds; adds the thread's CPU seconds to *cpu.
double PlainWrite(const std::string& path, const dtrain::CheckpointData& d, std::vector<double>* cpu) {
  Settle();
  const double c0 = ThreadCpuSeconds();
  const auto t0 = Clock::now();
  const int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
  if (fd < 0) Die("cannot create " + path);
  for (const dtrain::TensorRecord& t : d.tensors) {
    for (size_t off = 0; off < t.bytes.size();) {
      const ssize_t n = ::write(fd, t.bytes.data() + off, t.bytes.size() - off);
      if (n <= 0) Die("write failed: " + path);
      off += static_cast<size_t>(n);
    }
  }
  if (::fsync(fd) != 0) Die("fsync failed: " + path);
  ::close(fd);
  const double s = Seconds(t0);
  cpu->push_back(ThreadCpuSeconds() - c0);
  fs::remove(path);
  return s;
}

// Drops the page-cache pages of every file under `dir` (they are clean:
// RocksDB synced them).
void DropPageCache(const std::string& dir) {
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    const int fd = ::open(e.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}

// Disk space the files under `dir` occupy (allocated blocks, as du counts:
// RocksDB preallocates its log files).
uint64_t DirBytes(const std::string& dir) {
  uint64_t n = 0;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    struct stat st;
    if (e.is_regular_file() && ::stat(e.path().c_str(), &st) == 0) n += static_cast<uint64_t>(st.st_blocks) * 512;
  }
  return n;
}

struct Variant {
  Variant(std::string n, dtrain::WritePath p) : name(std::move(n)), path(p) {}
  std::string name;
  dtrain::WritePath path;
  std::vector<double> save, save_cpu, flush, load, restore_open, restore_load;
  uint64_t disk_bytes = 0;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench/checkpoint: checkpoint store save/restore vs plain sequential file writes"};
  int mb = 128, n_tensors = 60, reps = 5;
  std::string parent = "/tmp";
  std::string out = "bench/results/checkpoint.json";
  app.add_option("--mb", mb, "model size in MiB")->capture_default_str();
  app.add_option("--tensors", n_tensors, "number of float32 tensors")->capture_default_str();
  app.add_option("--reps", reps, "repetitions (medians are reported)")->capture_default_str();
  app.add_option("--dir", parent,
                 "where to write (a scratch folder in it is removed at the end); on the disk to measure")
      ->capture_default_str();
  app.add_option("--out", out, "JSON output")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (mb < 1 || n_tensors < 1 || reps < 1) Die("--mb, --tensors and --reps must be >= 1");
  const std::string dir = parent + "/dtrain_bench_checkpoint." + std::to_string(::getpid());
  dtrain::LoggingOptions lo;
  lo.level = "warn";
  (void)dtrain::InitLogging(lo);

  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) Die("cannot create " + dir + ": " + ec.message());
  const uint64_t total = static_cast<uint64_t>(mb) << 20;
  dtrain::CheckpointData model = MakeModel(total, n_tensors);
  const double model_mb = static_cast<double>(model.ByteSize()) / (1 << 20);
  {
    std::vector<double> crc;
    for (int i = 0; i < 3; ++i) {
      const auto t0 = Clock::now();
      uint32_t c = 0;
      for (const auto& t : model.tensors) c ^= dtrain::crc32c::Value(t.bytes);
      crc.push_back(Seconds(t0));
      if (c == 1) std::printf(" ");
    }
    std::printf("CRC32C (%s): %.0f MiB/s\n", dtrain::crc32c::HardwareAccelerated() ? "SSE4.2" : "table",
                model_mb / Median(crc));
  }

  std::vector<Variant> variants = {{"store, table-file ingestion (default)", dtrain::WritePath::kIngest},
                                   {"store, synced WriteBatch", dtrain::WritePath::kWriteBatch}};
  std::vector<double> plain, plain_cpu;
  for (int r = 0; r < reps; ++r) {
    // The plain write comes first in reps 1, 3, ..., between the two store
    // variants in reps 2, 4, ...
    if (r % 2 == 0) plain.push_back(PlainWrite(dir + "/plain.bin", model, &plain_cpu));
    for (size_t vi = 0; vi < variants.size(); ++vi) {
      if (vi == 1 && r % 2 == 1) plain.push_back(PlainWrite(dir + "/plain.bin", model, &plain_cpu));
      Variant& v = variants[vi];
      dtrain::StoreOptions o;
      o.path = dir + "/store_" + (v.path == dtrain::WritePath::kIngest ? "ingest" : "batch");
      o.job_name = model.job_name;
      o.config_digest = model.config_digest;
      o.write_path = v.path;
      std::unique_ptr<dtrain::CheckpointStore> store;
      Check(dtrain::CheckpointStore::Open(o, &store));
      model.step = r + 1;
      Settle();
      const double c0 = ThreadCpuSeconds();
      auto t0 = Clock::now();
      Check(store->Save(model));
      v.save.push_back(Seconds(t0));
      v.save_cpu.push_back(ThreadCpuSeconds() - c0);
      t0 = Clock::now();
      Check(store->Flush());
      v.flush.push_back(Seconds(t0));
      dtrain::CheckpointData loaded;
      t0 = Clock::now();
      Check(store->Load(model.step, &loaded));
      v.load.push_back(Seconds(t0));
      if (loaded.ByteSize() != model.ByteSize()) Die("loaded checkpoint differs in size");
      loaded = {};
      store.reset();
      DropPageCache(o.path);
      t0 = Clock::now();
      Check(dtrain::CheckpointStore::Open(o, &store));
      v.restore_open.push_back(Seconds(t0));
      t0 = Clock::now();
      Check(store->Load(model.step, &loaded));
      v.restore_load.push_back(Seconds(t0));
      v.disk_bytes = DirBytes(o.path);
    }
    std::printf("rep %d: plain %.0f MiB/s", r + 1, model_mb / plain.back());
    for (const Variant& v : variants) std::printf(", %s %.0f MiB/s", v.name.c_str(), model_mb / v.save.back());
    std::printf("\n");
  }

  const double plain_bw = model_mb / Median(plain);
  struct stat dir_st, cwd_st;
  const bool same_fs = ::stat(dir.c_str(), &dir_st) == 0 && ::stat(".", &cwd_st) == 0 && dir_st.st_dev == cwd_st.st_dev;
  std::printf(
      "\nmodel: %d float32 tensors, %.1f MiB; %d reps, medians; dir %s (%s filesystem as the working "
      "directory)\n",
      n_tensors, model_mb, reps, dir.c_str(), same_fs ? "same" : "NOT the same");
  std::printf("%-32s %10s %10s %9s %9s\n", "", "seconds", "MiB/s", "vs plain", "CPU s");
  std::printf("%-32s %10.3f %10.0f %9s %9.3f\n", "plain write + fsync", Median(plain), plain_bw, "1.00",
              Median(plain_cpu));
  nlohmann::ordered_json jv = nlohmann::ordered_json::array();
  for (const Variant& v : variants) {
    const double save = Median(v.save), load = Median(v.load), flush = Median(v.flush);
    const double ropen = Median(v.restore_open), rload = Median(v.restore_load);
    std::printf("%s\n", v.name.c_str());
    std::printf("  %-30s %10.3f %10.0f %9.2f %9.3f   (goal >= 0.70)\n", "save (durable commit)", save, model_mb / save,
                plain_bw > 0 ? (model_mb / save) / plain_bw : 0, Median(v.save_cpu));
    if (v.path == dtrain::WritePath::kWriteBatch) {
      std::printf("  %-30s %10.3f %10.0f\n", "memtable flush after save", flush, model_mb / flush);
    } else {
      std::printf("  %-30s %10.3f %10s\n", "memtable flush after save", flush, "-");
    }
    std::printf("  %-30s %10.3f %10.0f\n", "load right after save", load, model_mb / load);
    std::printf("  %-30s %10.3f\n", "restore: open (cold)", ropen);
    std::printf("  %-30s %10.3f %10.0f\n", "restore: load (cold)", rload, model_mb / rload);
    std::printf("  %-30s %10.0f MiB after %d saves (keep_last 3)\n", "store on disk", v.disk_bytes / 1048576.0, reps);
    jv.push_back({{"name", v.name},
                  {"write_path", v.path == dtrain::WritePath::kIngest ? "ingest" : "write_batch"},
                  {"save_s", v.save},
                  {"save_cpu_s", v.save_cpu},
                  {"flush_s", v.flush},
                  {"load_after_save_s", v.load},
                  {"restore_open_cold_s", v.restore_open},
                  {"restore_load_cold_s", v.restore_load},
                  {"median_save_mib_per_s", model_mb / save},
                  {"save_over_plain", (model_mb / save) / plain_bw},
                  {"median_load_after_save_mib_per_s", model_mb / load},
                  {"median_restore_s", ropen + rload},
                  {"median_restore_load_mib_per_s", model_mb / rload},
                  {"disk_bytes_after_reps", v.disk_bytes}});
  }
  nlohmann::ordered_json j = {{"benchmark", "checkpoint"},
                              {"model_mib", model_mb},
                              {"tensors", n_tensors},
                              {"reps", reps},
                              {"dir", parent},
                              {"dir_on_same_filesystem_as_cwd", same_fs},
                              {"crc32c_hardware", dtrain::crc32c::HardwareAccelerated()},
                              {"plain_write_fsync_s", plain},
                              {"plain_write_fsync_cpu_s", plain_cpu},
                              {"median_plain_mib_per_s", plain_bw},
                              {"variants", jv},
                              {"goal_save_over_plain", 0.70}};
  fs::remove_all(dir);
  std::ofstream(out) << j.dump(2) << "\n";
  std::printf("wrote %s\n", out.c_str());
  return 0;
}
