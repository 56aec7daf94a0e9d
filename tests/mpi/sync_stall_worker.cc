// A two-rank training job in which rank 1 stalls (sleeps for ten minutes in
// its third gradient bucket, as a hung data loader or a dead GPU would) for the
// hang-safety test in tests/worker/sync_job_test.cc. The fault is injected by
// wrapping the Collective, the rest is the real trainer and sync strategy.
//
//   launch/mpirun.sh -n 2 -- sync_stall_worker RUN_DIR
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "dtrain/common/config.h"
#include "dtrain/common/logging.h"
#include "dtrain/worker/collective/mpi_collective.h"
#include "dtrain/worker/run_job.h"
#include "dtrain/worker/sync_strategy.h"

namespace dtrain::worker {
namespace {

using namespace collective;

// Forwards everything; on `stall_rank`, the `stall_at`-th gradient bucket
// all-reduce first sleeps for ten minutes.
class StallingCollective : public Collective {
 public:
  StallingCollective(std::unique_ptr<Collective> inner, int stall_rank, int stall_at)
      : inner_(std::move(inner)), stall_rank_(stall_rank), stall_at_(stall_at) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  const char* backend() const override { return inner_->backend(); }
  std::shared_ptr<Work> AllReduce(at::Tensor t, ReduceOp op, OpOptions o) override {
    if (rank() == stall_rank_ && o.label.rfind("grad bucket", 0) == 0 && ++buckets_ == stall_at_) {
      std::fprintf(stderr, "sync_stall_worker: rank %d stalls in %s\n", rank(), o.label.c_str());
      std::this_thread::sleep_for(std::chrono::minutes(10));
    }
    return inner_->AllReduce(t, op, o);
  }
  std::shared_ptr<Work> Broadcast(at::Tensor t, int root, OpOptions o) override { return inner_->Broadcast(t, root, o); }
  std::shared_ptr<Work> AllGather(at::Tensor out, at::Tensor in, OpOptions o) override {
    return inner_->AllGather(out, in, o);
  }
  std::shared_ptr<Work> Barrier(OpOptions o) override { return inner_->Barrier(o); }
  std::shared_ptr<Work> Send(at::Tensor t, int dst, int tag, OpOptions o) override {
    return inner_->Send(t, dst, tag, o);
  }
  std::shared_ptr<Work> Recv(at::Tensor t, int src, int tag, OpOptions o) override {
    return inner_->Recv(t, src, tag, o);
  }
  [[noreturn]] void Abort(int code) override {
    inner_->Abort(code);
    std::abort();
  }

 private:
  std::unique_ptr<Collective> inner_;
  int stall_rank_, stall_at_, buckets_ = 0;
};

Status Main(const std::string& run_dir) {
  JobConfig config;
  DTRAIN_RETURN_IF_ERROR(ParseJobConfig(R"(
      name: "stall"
      model { widths: [8, 16] embedding_dim: 16 }
      data { batch_size: 32 train_limit: 1024 }
      training { epochs: 1 threads: 1 progress_bar: false log_every_steps: 1 }
      parallelism { sync { collective_timeout_s: 3 } }
      checkpoint { every_epochs: 0 }
      launch { workers: 2 }
    )",
                                        "stall.textproto", {"run_dir=" + run_dir}, &config));
  DTRAIN_RETURN_IF_ERROR(MpiRuntime::Init());
  MpiCollectiveOptions co;
  co.timeout = std::chrono::seconds(3);
  std::unique_ptr<MpiCollective> mpi;
  DTRAIN_RETURN_IF_ERROR(MpiCollective::Create(co, &mpi));
  auto stalling = std::make_unique<StallingCollective>(std::move(mpi), /*stall_rank=*/1, /*stall_at=*/3);
  auto strategy = std::make_unique<SyncStrategy>(std::move(stalling), SyncOptionsFromConfig(config));
  std::unique_ptr<Trainer> trainer;
  TrainerOptions to;
  to.progress = false;
  to.evaluate = false;
  DTRAIN_RETURN_IF_ERROR(Trainer::Create(config, std::move(strategy), to, &trainer));
  TrainResult r;
  return trainer->Run(&r);
}

}  // namespace
}  // namespace dtrain::worker

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: sync_stall_worker RUN_DIR (under mpirun, 2 ranks)\n");
    return 2;
  }
  dtrain::LoggingOptions lo;
  lo.role = "stall-test";
  (void)dtrain::InitLogging(lo);
  return dtrain::worker::FinishProcess("sync_stall_worker", dtrain::worker::Main(argv[1]));
}
