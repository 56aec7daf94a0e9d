// Sync jobs as users start them: real mpirun, real dtrain-worker processes.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>

#include "dtrain/worker/sync_strategy.h"

namespace dtrain::worker {
namespace {

using ::testing::HasSubstr;

// Runs `command` through the shell; returns its exit status and output.
int RunCommand(const std::string& command, std::string* output) {
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return -1;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) output->append(buf, n);
  const int status = pclose(pipe);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

TEST(AssignBucketsTest, WalksParametersInReverseAndClosesBucketsAtTheCap) {
  // Parameters 0..5 of 100, 300, 50, 400, 10, 10 bytes, cap 400.
  auto b = AssignBuckets({100, 300, 50, 400, 10, 10}, {6, 6, 6, 6, 6, 6}, 400);
  ASSERT_EQ(b.size(), 2u);
  EXPECT_EQ(b[0], (std::vector<size_t>{5, 4, 3}));  // 420 >= 400
  EXPECT_EQ(b[1], (std::vector<size_t>{2, 1, 0}));  // 450
}

TEST(AssignBucketsTest, EveryParameterInExactlyOneBucketAndDtypesNeverMix) {
  std::vector<int64_t> bytes;
  std::vector<int> dtypes;
  for (int i = 0; i < 40; ++i) {
    bytes.push_back(1 + (i * 37) % 500);
    dtypes.push_back(i < 25 ? 6 : 15);  // float32 then bfloat16
  }
  auto buckets = AssignBuckets(bytes, dtypes, 1000);
  std::vector<int> seen(40, 0);
  size_t expected_next = 39;
  for (const auto& bucket : buckets) {
    ASSERT_FALSE(bucket.empty());
    int64_t total = 0;
    for (size_t p : bucket) {
      EXPECT_EQ(p, expected_next--) << "reverse registration order";
      ++seen[p];
      total += bytes[p];
      EXPECT_EQ(dtypes[p], dtypes[bucket[0]]);
    }
    // Only the last parameter may take a bucket past the cap.
    EXPECT_LT(total - bytes[bucket.back()], 1000);
  }
  for (int c : seen) EXPECT_EQ(c, 1);
  // One bucket for everything under a huge cap (per dtype).
  EXPECT_EQ(AssignBuckets(bytes, dtypes, int64_t{1} << 40).size(), 2u);
}

// Rank 1 stalls inside its third gradient bucket; rank 0 must give up after
// the 3 s collective timeout with a message naming the operation, the bucket
// and rank 1, and the whole job must end non-zero instead of hanging.
TEST(SyncJobTest, StalledRankEndsTheJobWithATimeoutErrorNotAHang) {
  const std::string run_dir = std::string(DTRAIN_BINARY_DIR) + "/sync_stall_run";
  std::filesystem::remove_all(run_dir);
  const std::string cmd = "OMP_NUM_THREADS=1 timeout 300 bash " + std::string(DTRAIN_SOURCE_DIR) +
                          "/launch/mpirun.sh -n 2 -- " + std::string(DTRAIN_BINARY_DIR) +
                          "/tests/sync_stall_worker " + run_dir;
  const auto start = std::chrono::steady_clock::now();
  std::string out;
  const int rc = RunCommand(cmd, &out);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_NE(rc, 0) << out;
  EXPECT_NE(rc, 124) << "the job hung until timeout(1) killed it:\n" << out;
  EXPECT_LT(secs, 120) << out;
  EXPECT_THAT(out, HasSubstr("rank 1 stalls in grad bucket"));
  EXPECT_THAT(out, HasSubstr("allreduce 'grad bucket"));
  EXPECT_THAT(out, HasSubstr("rank(s) 1 had not arrived"));
  EXPECT_THAT(out, HasSubstr("ending every rank of the job"));
  std::filesystem::remove_all(run_dir);
}

}  // namespace
}  // namespace dtrain::worker
