// main() of the tests that run as real MPI ranks (ctest starts them with
// launch/mpirun.sh -n 2 or more). Every rank runs every test; only rank 0
// prints the usual report, the other ranks print their failures, tagged.
#include <gtest/gtest.h>

#include <cstdio>

#include "dtrain/worker/collective/mpi_collective.h"

namespace {

class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: failure\n%s\n", rank_, r.file_name() ? r.file_name() : "?",
                 r.line_number(), r.summary());
  }

 private:
  int rank_;
};

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  dtrain::Status st = dtrain::collective::MpiRuntime::Init();
  if (!st.ok()) {
    std::fprintf(stderr, "MPI initialisation failed: %s\n", st.ToString().c_str());
    return 1;
  }
  const int rank = dtrain::collective::MpiRuntime::world_rank();
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  const int rc = RUN_ALL_TESTS();
  dtrain::collective::MpiRuntime::Finalize();
  return rc;
}
