// The MPI backend of Collective, on real ranks (2 to 4 processes).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <thread>

#include "dtrain/worker/collective/mpi_collective.h"
#include "dtrain/worker/collective/nccl_collective.h"

namespace dtrain::collective {
namespace {

using ::testing::HasSubstr;

class MpiCollectiveTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MpiCollectiveOptions o;
    o.timeout = std::chrono::seconds(60);
    Status st = MpiCollective::Create(o, &coll_);
    ASSERT_TRUE(st.ok()) << st;
    rank_ = coll_->rank();
    size_ = coll_->size();
  }
  std::unique_ptr<MpiCollective> coll_;
  int rank_ = 0;
  int size_ = 1;
};

TEST_F(MpiCollectiveTest, SizeAndRankMatchTheWorld) {
  EXPECT_EQ(size_, MpiRuntime::world_size());
  EXPECT_EQ(rank_, MpiRuntime::world_rank());
  EXPECT_GE(size_, 2) << "run these tests under mpirun with at least 2 ranks";
  EXPECT_STREQ(coll_->backend(), "mpi");
}

TEST_F(MpiCollectiveTest, AllReduceSumAverageAndMax) {
  // Rank r holds r + 1 + i in element i.
  for (auto dtype : {torch::kFloat32, torch::kFloat64, torch::kInt64, torch::kInt32}) {
    torch::Tensor base = torch::arange(1000, torch::kFloat64) + (rank_ + 1);
    torch::Tensor sum = base.to(dtype).clone(), max = base.to(dtype).clone();
    ASSERT_TRUE(coll_->AllReduce(sum, ReduceOp::kSum)->Wait().ok());
    ASSERT_TRUE(coll_->AllReduce(max, ReduceOp::kMax)->Wait().ok());
    const double rank_sum = size_ * (size_ + 1) / 2.0;
    torch::Tensor expect_sum = torch::arange(1000, torch::kFloat64) * size_ + rank_sum;
    EXPECT_TRUE(torch::equal(sum.to(torch::kFloat64), expect_sum)) << dtype;
    EXPECT_TRUE(torch::equal(max.to(torch::kFloat64), torch::arange(1000, torch::kFloat64) + size_)) << dtype;
  }
  torch::Tensor avg = torch::full({5}, static_cast<float>(rank_), torch::kFloat32);
  ASSERT_TRUE(coll_->AllReduce(avg, ReduceOp::kAverage)->Wait().ok());
  EXPECT_TRUE(torch::allclose(avg, torch::full({5}, (size_ - 1) / 2.0f)));
}

TEST_F(MpiCollectiveTest, CompressedWiresAreCloseAndKeepTheDtype) {
  torch::manual_seed(7 + rank_);
  torch::Tensor x = torch::randn({4096});
  torch::Tensor exact = x.clone();
  ASSERT_TRUE(coll_->AllReduce(exact, ReduceOp::kAverage)->Wait().ok());
  for (WireType wire : {WireType::kFp16, WireType::kBf16}) {
    torch::Tensor y = x.clone();
    OpOptions o;
    o.wire = wire;
    Status st = coll_->AllReduce(y, ReduceOp::kAverage, o)->Wait();
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_EQ(y.scalar_type(), torch::kFloat32);
    const double tol = wire == WireType::kFp16 ? 2e-3 : 2e-2;
    EXPECT_LT((y - exact).abs().max().item<double>(), tol * (1 + exact.abs().max().item<double>()))
        << WireTypeName(wire);
    EXPECT_FALSE(torch::equal(y, exact)) << "a 16-bit wire must actually round";
  }
}

TEST_F(MpiCollectiveTest, BroadcastFromEveryRoot) {
  for (int root = 0; root < size_; ++root) {
    torch::Tensor t = torch::full({3, 7}, static_cast<double>(rank_ * 10 + 1), torch::kFloat64);
    ASSERT_TRUE(coll_->Broadcast(t, root)->Wait().ok());
    EXPECT_TRUE(torch::equal(t, torch::full({3, 7}, static_cast<double>(root * 10 + 1), torch::kFloat64)));
  }
}

TEST_F(MpiCollectiveTest, AllGatherConcatenatesInRankOrder) {
  torch::Tensor in = torch::full({2, 3}, static_cast<int64_t>(rank_), torch::kInt64);
  torch::Tensor out = torch::empty({2 * size_, 3}, torch::kInt64);
  ASSERT_TRUE(coll_->AllGather(out, in)->Wait().ok());
  for (int r = 0; r < size_; ++r) {
    EXPECT_TRUE(torch::equal(out.narrow(0, 2 * r, 2), torch::full({2, 3}, static_cast<int64_t>(r), torch::kInt64)));
  }
}

TEST_F(MpiCollectiveTest, SendRecvAroundARing) {
  const int next = (rank_ + 1) % size_, prev = (rank_ + size_ - 1) % size_;
  torch::Tensor out = torch::full({100}, static_cast<float>(rank_));
  torch::Tensor in = torch::empty({100});
  // Tags keep two messages between the same pair apart.
  torch::Tensor out2 = torch::full({4}, static_cast<float>(100 + rank_));
  torch::Tensor in2 = torch::empty({4});
  auto r2 = coll_->Recv(in2, prev, /*tag=*/2);
  auto r1 = coll_->Recv(in, prev, /*tag=*/1);
  auto s1 = coll_->Send(out, next, 1);
  auto s2 = coll_->Send(out2, next, 2);
  ASSERT_TRUE(WaitAll({r1, r2, s1, s2}).ok());
  EXPECT_TRUE(torch::equal(in, torch::full({100}, static_cast<float>(prev))));
  EXPECT_TRUE(torch::equal(in2, torch::full({4}, static_cast<float>(100 + prev))));
}

TEST_F(MpiCollectiveTest, ManyOperationsInFlightCompleteInIssueOrder) {
  std::vector<torch::Tensor> ts;
  std::vector<std::shared_ptr<Work>> works;
  for (int i = 0; i < 32; ++i) {
    // Sizes from 4 B to 4 MB, all in flight at once.
    ts.push_back(torch::full({int64_t{1} << (i % 21)}, static_cast<float>(i + rank_)));
    OpOptions o;
    o.label = "op " + std::to_string(i);
    works.push_back(coll_->AllReduce(ts.back(), ReduceOp::kSum, o));
  }
  works.push_back(coll_->Barrier());
  ASSERT_TRUE(WaitAll(works).ok());
  for (int i = 0; i < 32; ++i) {
    const float expect = static_cast<float>(i * size_ + size_ * (size_ - 1) / 2);
    EXPECT_EQ(ts[i][0].item<float>(), expect) << i;
    EXPECT_TRUE(works[i]->IsCompleted());
    EXPECT_GE(works[i]->seconds(), 0.0);
  }
  EXPECT_GT(coll_->bytes_sent(), 0);
}

TEST_F(MpiCollectiveTest, BadArgumentsFailAtOnceWithoutCommunicating) {
  torch::Tensor strided = torch::zeros({4, 4}).t();
  Status st = coll_->AllReduce(strided, ReduceOp::kSum)->Wait();
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("contiguous"));
  st = coll_->AllGather(torch::zeros({3}), torch::zeros({2}))->Wait();
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  st = coll_->AllReduce(torch::zeros({2}, torch::kInt64), ReduceOp::kAverage)->Wait();
  EXPECT_THAT(st.message(), HasSubstr("floating-point"));
  st = coll_->Send(torch::zeros({2}), rank_, 0)->Wait();
  EXPECT_THAT(st.message(), HasSubstr("bad destination"));
  OpOptions o;
  o.wire = WireType::kFp16;
  st = coll_->AllReduce(torch::zeros({2}, torch::kInt32), ReduceOp::kSum, o)->Wait();
  EXPECT_THAT(st.message(), HasSubstr("compression"));
  // The collective still works afterwards.
  torch::Tensor t = torch::ones({1});
  ASSERT_TRUE(coll_->AllReduce(t, ReduceOp::kSum)->Wait().ok());
  EXPECT_EQ(t.item<float>(), static_cast<float>(size_));
}

// A rank that does not arrive: the others fail with DeadlineExceeded naming
// the operation, its label and the missing rank, instead of hanging; the
// broken collective refuses later work at once.
TEST_F(MpiCollectiveTest, StalledRankIsNamedInTheTimeoutError) {
  MpiCollectiveOptions o;
  o.timeout = std::chrono::milliseconds(1500);
  std::unique_ptr<MpiCollective> stalling;
  ASSERT_TRUE(MpiCollective::Create(o, &stalling).ok());
  const int late = size_ - 1;  // this rank arrives after the others gave up
  torch::Tensor t = torch::ones({256});
  OpOptions label;
  label.label = "grad bucket 3/7";
  if (rank_ != late) {
    const auto start = std::chrono::steady_clock::now();
    Status st = stalling->AllReduce(t, ReduceOp::kSum, label)->Wait();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(st.code(), Status::Code::kDeadlineExceeded) << st;
    EXPECT_THAT(st.message(), HasSubstr("allreduce 'grad bucket 3/7'"));
    EXPECT_THAT(st.message(), HasSubstr("rank(s) " + std::to_string(late) + " had not arrived"));
    if (size_ > 2) {
      EXPECT_THAT(st.message(), HasSubstr("were waiting in it"));
    }
    EXPECT_GE(secs, 1.4);
    EXPECT_LT(secs, 30.0);
    Status later = stalling->Barrier()->Wait();
    EXPECT_EQ(later.code(), Status::Code::kAborted);
    EXPECT_THAT(later.message(), HasSubstr("broken"));
  } else {
    // Arrive late: the others' operation (still inside MPI) completes with
    // this one, so that no thread is left in MPI at MPI_Finalize.
    std::this_thread::sleep_for(std::chrono::milliseconds(3000));
    EXPECT_TRUE(stalling->AllReduce(t, ReduceOp::kSum, label)->Wait().ok());
  }
  // Let every rank pass this point before the next test.
  ASSERT_TRUE(coll_->Barrier()->Wait().ok());
}

TEST(NcclCollectiveTest, AllReduceOnTheGpu) {
  if (!NcclAvailable()) GTEST_SKIP() << "built without NCCL";
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU on this machine";
  std::unique_ptr<MpiCollective> boot;
  ASSERT_TRUE(MpiCollective::Create({}, &boot).ok());
  NcclCollectiveOptions no;
  no.device_index = boot->rank() % static_cast<int>(torch::cuda::device_count());
  std::unique_ptr<Collective> nccl;
  Status st = CreateNcclCollective(*boot, no, &nccl);
  ASSERT_TRUE(st.ok()) << st;
  auto dev = torch::Device(torch::kCUDA, no.device_index);
  torch::Tensor t = torch::full({1 << 20}, static_cast<float>(nccl->rank() + 1), dev);
  ASSERT_TRUE(nccl->AllReduce(t, ReduceOp::kSum)->Wait().ok());
  const float expect = nccl->size() * (nccl->size() + 1) / 2.0f;
  EXPECT_TRUE(torch::equal(t.cpu(), torch::full({1 << 20}, expect)));
  torch::Tensor g = torch::empty({nccl->size() * 4}, dev);
  ASSERT_TRUE(nccl->AllGather(g, torch::full({4}, static_cast<float>(nccl->rank()), dev))->Wait().ok());
  EXPECT_EQ(g.cpu()[4 * (nccl->size() - 1)].item<float>(), static_cast<float>(nccl->size() - 1));
  ASSERT_TRUE(nccl->Barrier()->Wait().ok());
}

}  // namespace
}  // namespace dtrain::collective
