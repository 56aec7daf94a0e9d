// The async strategy in the trainer, against real parameter-server shards on
// loopback (dtrain-ps's service, started in this process): with tau = 0 and
// one worker it trains exactly as local training does, and a job moves
// between local/sync and async through checkpoints keeping its parameters,
// optimizer state and step. Multi-process async jobs are tested end to end
// through dtrain run (tests/CMakeLists.txt, Async.*).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>

#include "dtrain/common/checkpoint_store.h"
#include "dtrain/common/config.h"
#include "dtrain/paramserver/service.h"
#include "dtrain/worker/async_strategy.h"
#include "dtrain/worker/trainer.h"

namespace dtrain::worker {
namespace {

namespace fs = std::filesystem;

class AsyncJobTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dtrain_async_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A tiny ArcFace job of 6 steps, checkpointed every 2. Short on purpose:
  // training amplifies rounding differences quickly (two runs that differ only
  // in the order of a float reduction, e.g. 1 vs 2 threads, differ by 3e-3
  // after 5 steps of a warmed-up schedule), so exact comparisons need few
  // steps; 6 steps keep them below 1e-6.
  JobConfig Config(const std::string& run, const std::string& mode, const std::vector<std::string>& extra = {}) {
    std::vector<std::string> overrides = {"run_dir=" + (dir_ / run).string(), "checkpoint.dir=" + (dir_ / "store").string()};
    overrides.insert(overrides.end(), extra.begin(), extra.end());
    JobConfig config;
    Status st = ParseJobConfig(R"(
        name: "async_test"
        model { widths: [8, 16] embedding_dim: 16 }
        loss { name: "arcface" }
        data { batch_size: 64 train_limit: 1024 test_limit: 200 }
        optimizer { kind: SGD lr: 0.05 momentum: 0.9 }
        training { max_steps: 6 threads: 1 log_every_steps: 2 progress_bar: false }
        checkpoint { every_steps: 2 keep_last: 10 async_save: false }
        eval { at_end: false }
      )" + mode,
                               "async_test.textproto", overrides, &config);
    EXPECT_TRUE(st.ok()) << st;
    return config;
  }

  // Two empty shards, as dtrain-ps starts them.
  void StartShards(const JobConfig& config) {
    servers_.clear();
    addresses_.clear();
    for (int s = 0; s < 2; ++s) {
      std::unique_ptr<paramserver::PsServer> server;
      ASSERT_TRUE(paramserver::PsServer::Start(paramserver::PsServerOptionsFromConfig(config, s, "tok"), &server).ok());
      addresses_.push_back("127.0.0.1:" + std::to_string(server->port()));
      servers_.push_back(std::move(server));
    }
  }

  std::unique_ptr<Strategy> Async(const JobConfig& config) {
    AsyncStrategyOptions o;
    o.addresses = addresses_;
    o.token = "tok";
    o.config = config.parallelism().async();
    return std::make_unique<AsyncStrategy>(std::move(o));
  }

  // Trains and returns copies of every parameter (model, then loss).
  std::vector<torch::Tensor> Train(const JobConfig& config, std::unique_ptr<Strategy> strategy, TrainerOptions options,
                                   TrainResult* result) {
    options.progress = false;
    options.evaluate = false;
    std::unique_ptr<Trainer> trainer;
    Status st = Trainer::Create(config, std::move(strategy), options, &trainer);
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) return {};
    st = trainer->Run(result);
    EXPECT_TRUE(st.ok()) << st;
    std::vector<torch::Tensor> out;
    for (const auto& p : trainer->model()->parameters()) out.push_back(p.detach().clone());
    for (const auto& p : trainer->loss()->parameters()) out.push_back(p.detach().clone());
    return out;
  }

  static double MaxDiff(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
    EXPECT_EQ(a.size(), b.size());
    double d = 0;
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) d = std::max(d, (a[i] - b[i]).abs().max().item<double>());
    return d;
  }

  fs::path dir_;
  std::vector<std::unique_ptr<paramserver::PsServer>> servers_;
  std::vector<std::string> addresses_;
};

constexpr const char* kLocal = "parallelism { sync {} }";
constexpr const char* kAsyncTau0 = "parallelism { async { shards: 2 max_staleness: 0 } }";

TEST_F(AsyncJobTest, TauZeroOneWorkerEqualsLocalTraining) {
  TrainResult local_r, async_r;
  const auto local = Train(Config("local", kLocal), std::make_unique<LocalStrategy>(), {}, &local_r);
  const JobConfig ac = Config("async", kAsyncTau0, {"checkpoint.dir=" + (dir_ / "store_async").string()});
  StartShards(ac);
  const auto async = Train(ac, Async(ac), {}, &async_r);
  EXPECT_EQ(async_r.steps, 6);
  // The shards' SGD equals LibTorch's (float loops in another order).
  EXPECT_LT(MaxDiff(local, async), 1e-5);
  EXPECT_GT(MaxDiff(local, Train(Config("init", kLocal, {"training.max_steps=1", "checkpoint.dir=" + (dir_ / "s1").string()}),
                                 std::make_unique<LocalStrategy>(), {}, &local_r)),
            1e-3)
      << "the comparison must be able to fail";
  for (int s = 0; s < 2; ++s) {
    auto shard = servers_[s]->shard();
    ASSERT_TRUE(shard);
    EXPECT_EQ(shard->version(), 6);
    const auto c = shard->counters();
    EXPECT_EQ(c.applied, 6);
    EXPECT_EQ(c.staleness_histogram, (std::map<int64_t, int64_t>{{0, 6}}));
  }
}

TEST_F(AsyncJobTest, LocalAsyncLocalResumeKeepsParametersOptimizerStateAndStep) {
  // The reference: 6 local steps in one go.
  TrainResult r;
  const auto reference =
      Train(Config("ref", kLocal, {"checkpoint.dir=" + (dir_ / "store_ref").string()}), std::make_unique<LocalStrategy>(), {}, &r);

  // Local to step 2, async (tau 0, one worker) to step 4, local to the end.
  TrainerOptions first;
  first.stop_after_steps = 2;
  Train(Config("switch", kLocal), std::make_unique<LocalStrategy>(), first, &r);
  EXPECT_EQ(r.steps, 2);

  const JobConfig ac = Config("switch", kAsyncTau0);
  StartShards(ac);
  TrainerOptions second;
  second.resume = true;
  second.stop_after_steps = 4;
  Train(ac, Async(ac), second, &r);
  EXPECT_EQ(r.resumed_from_step, 2);
  EXPECT_EQ(r.steps, 4);
  EXPECT_EQ(servers_[0]->shard()->version(), 4);  // resumed at version 2, two pushes
  {
    StoreOptions so;
    so.path = (dir_ / "store").string();
    so.read_only = true;
    so.create_if_missing = false;
    std::unique_ptr<CheckpointStore> store;
    ASSERT_TRUE(CheckpointStore::Open(so, &store).ok());
    CheckpointData data;
    std::vector<std::string> warnings;
    ASSERT_TRUE(store->LoadLatestGood(&data, &warnings).ok());
    EXPECT_EQ(data.step, 4);
    EXPECT_EQ(data.mode, "async");
    // The shards' momentum buffers came back into the checkpoint.
    bool momentum = false;
    for (const TensorRecord& t : data.tensors) momentum |= t.name.find("/momentum_buffer") != std::string::npos;
    EXPECT_TRUE(momentum);
  }
  servers_.clear();

  TrainerOptions third;
  third.resume = true;
  const auto switched = Train(Config("switch", kLocal), std::make_unique<LocalStrategy>(), third, &r);
  EXPECT_EQ(r.resumed_from_step, 4);
  EXPECT_EQ(r.steps, 6);
  EXPECT_LT(MaxDiff(reference, switched), 1e-5);
}

}  // namespace
}  // namespace dtrain::worker
