// checkpoint_crash_writer: the child process of the checkpoint store's crash
// tests (tests/common/checkpoint_store_test.cc). It saves checkpoints into a
// store until it is killed, or, with --die-at, kills itself (SIGKILL) at a
// named fault point of one save.
//
//   checkpoint_crash_writer STORE_DIR [--mb N] [--count N] [--die-at POINT --die-on-save K] [--write-batch]
//
// Steps continue from the store's latest (1 for an empty store). Every
// checkpoint's contents are derived from its step (MakeCrashCheckpoint, the
// same function as in the test), so the parent can check any checkpoint it
// finds. After each committed save it prints "saved <step>" on stdout and
// flushes: a step printed is a step the store must keep.
#include <signal.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "dtrain/common/checkpoint_store.h"
#include "crash_checkpoint.h"

namespace {

using dtrain::testing_crash::MakeCrashCheckpoint;

int Usage() {
  std::fprintf(stderr,
               "usage: checkpoint_crash_writer STORE_DIR [--mb N] [--count N] [--die-at POINT --die-on-save K] "
               "[--write-batch]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return Usage();
  const std::string dir = argv[1];
  int mb = 20;
  long long count = -1;  // forever
  std::string die_at;
  long long die_on_save = 1;
  bool write_batch = false;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--write-batch") {
      write_batch = true;
      continue;
    }
    if (i + 1 >= argc) return Usage();
    if (a == "--mb") {
      mb = std::atoi(argv[++i]);
    } else if (a == "--count") {
      count = std::atoll(argv[++i]);
    } else if (a == "--die-at") {
      die_at = argv[++i];
    } else if (a == "--die-on-save") {
      die_on_save = std::atoll(argv[++i]);
    } else {
      return Usage();
    }
  }

  long long save_index = 0;  // 1-based number of the save in progress
  dtrain::StoreOptions o;
  o.path = dir;
  o.job_name = "crash_test";
  o.config_digest = "digest-1";
  o.keep_last = 3;
  o.write_path = write_batch ? dtrain::WritePath::kWriteBatch : dtrain::WritePath::kIngest;
  if (!die_at.empty()) {
    o.fault_hook = [&](const char* point) {
      if (save_index == die_on_save && die_at == point) raise(SIGKILL);
      return dtrain::Status::OK();
    };
  }
  std::unique_ptr<dtrain::CheckpointStore> store;
  dtrain::Status st = dtrain::CheckpointStore::Open(o, &store);
  if (!st.ok()) {
    std::fprintf(stderr, "%s\n", st.ToString().c_str());
    return 1;
  }
  int64_t step = 0;
  st = store->LatestStep(&step);
  if (!st.ok() && st.code() != dtrain::Status::Code::kNotFound) {
    std::fprintf(stderr, "%s\n", st.ToString().c_str());
    return 1;
  }
  for (++step; count < 0 || save_index < count; ++step) {
    ++save_index;
    st = store->Save(MakeCrashCheckpoint(step, mb));
    if (!st.ok()) {
      std::fprintf(stderr, "%s\n", st.ToString().c_str());
      return 1;
    }
    std::printf("saved %lld\n", static_cast<long long>(step));
    std::fflush(stdout);
  }
  return 0;
}
