// The pipeline engine in one process: balanced partitions (against an
// exhaustive search), the GPipe and 1F1B schedules and their activation
// bounds, micro-batch sizes, the partition of the real embedder, and a
// one-stage pipeline whose uneven micro-batches must give the full batch's
// mean gradient (not the 1/M-scaled one). The multi-rank tests are in
// tests/mpi/pipeline_test.cc.
#include "dtrain/worker/pipeline.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <functional>
#include <random>

#include "dtrain/models/registry.h"

namespace dtrain::worker::pipeline {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// The smallest largest-stage cost over every contiguous cut.
double BestByBruteForce(const std::vector<double>& costs, int stages) {
  const int n = static_cast<int>(costs.size());
  double best = std::numeric_limits<double>::infinity();
  std::function<void(int, int, double)> go = [&](int start, int left, double worst) {
    if (left == 1) {
      double c = 0;
      for (int i = start; i < n; ++i) c += costs[static_cast<size_t>(i)];
      best = std::min(best, std::max(worst, c));
      return;
    }
    double c = 0;
    for (int end = start + 1; end <= n - (left - 1); ++end) {
      c += costs[static_cast<size_t>(end) - 1];
      go(end, left - 1, std::max(worst, c));
    }
  };
  go(0, stages, 0);
  return best;
}

TEST(PipelinePartitionTest, BalanceIsOptimalAndContiguous) {
  std::vector<int> counts;
  ASSERT_TRUE(BalanceByCost({1, 1, 1, 1}, 2, &counts).ok());
  EXPECT_THAT(counts, ElementsAre(2, 2));
  ASSERT_TRUE(BalanceByCost({5, 1, 1, 1, 1, 1}, 2, &counts).ok());
  EXPECT_THAT(counts, ElementsAre(1, 5));
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> cost(0.0, 10.0);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 2 + static_cast<int>(rng() % 7);
    const int stages = 1 + static_cast<int>(rng() % std::min(n, 4));
    std::vector<double> costs(static_cast<size_t>(n));
    for (double& c : costs) c = cost(rng);
    ASSERT_TRUE(BalanceByCost(costs, stages, &counts).ok());
    ASSERT_EQ(static_cast<int>(counts.size()), stages);
    double worst = 0;
    int at = 0;
    for (int c : counts) {
      ASSERT_GE(c, 1);
      double sum = 0;
      for (int i = at; i < at + c; ++i) sum += costs[static_cast<size_t>(i)];
      worst = std::max(worst, sum);
      at += c;
    }
    EXPECT_EQ(at, n);
    EXPECT_NEAR(worst, BestByBruteForce(costs, stages), 1e-9) << "trial " << trial;
  }
  EXPECT_THAT(BalanceByCost({1, 2}, 3, &counts).message(), HasSubstr("cannot cut 2 layer(s) into 3"));
  EXPECT_FALSE(BalanceByCost({1, -2, 3}, 2, &counts).ok());
}

TEST(PipelineScheduleTest, EveryMicroBatchOnceAndActivationBounds) {
  for (int stages = 1; stages <= 4; ++stages) {
    for (int stage = 0; stage < stages; ++stage) {
      for (int m = 1; m <= 8; ++m) {
        for (auto kind : {PipelineConfig::GPIPE, PipelineConfig::ONE_F_ONE_B}) {
          const std::vector<Op> ops = Schedule(kind, stages, stage, m);
          ASSERT_EQ(static_cast<int>(ops.size()), 2 * m);
          std::vector<int> forwarded(static_cast<size_t>(m), 0), backwarded(static_cast<size_t>(m), 0);
          for (const Op& op : ops) {
            if (op.forward) {
              ++forwarded[static_cast<size_t>(op.micro_batch)];
            } else {
              ASSERT_EQ(forwarded[static_cast<size_t>(op.micro_batch)], 1) << "backward before forward";
              ++backwarded[static_cast<size_t>(op.micro_batch)];
            }
          }
          for (int i = 0; i < m; ++i) {
            EXPECT_EQ(forwarded[static_cast<size_t>(i)], 1);
            EXPECT_EQ(backwarded[static_cast<size_t>(i)], 1);
          }
          const int peak = PeakInFlight(ops);
          if (kind == PipelineConfig::GPIPE) {
            EXPECT_EQ(peak, m);
          } else {
            EXPECT_EQ(peak, std::min(stages - stage, m)) << "stage " << stage << "/" << stages << ", M " << m;
          }
        }
      }
    }
  }
  // 1F1B on the first of 3 stages, 4 micro-batches: 2 warm-up forwards.
  const std::vector<Op> ops = Schedule(PipelineConfig::ONE_F_ONE_B, 3, 0, 4);
  std::string text;
  for (const Op& op : ops) text += (op.forward ? "F" : "B") + std::to_string(op.micro_batch) + " ";
  EXPECT_EQ(text, "F0 F1 F2 B0 F3 B1 B2 B3 ");
}

TEST(PipelineScheduleTest, MicroBatchSizesAddUpAndDifferByAtMostOne) {
  EXPECT_THAT(MicroBatchSizes(10, 3), ElementsAre(4, 3, 3));
  EXPECT_THAT(MicroBatchSizes(8, 4), ElementsAre(2, 2, 2, 2));
  EXPECT_THAT(MicroBatchSizes(5, 5), ElementsAre(1, 1, 1, 1, 1));
}

models::Embedder SmallEmbedder() {
  ModelConfig mc;
  mc.set_name("resnet_embedder");
  mc.set_embedding_dim(16);
  mc.add_widths(8);
  mc.add_widths(16);
  models::Embedder model{nullptr};
  EXPECT_TRUE(models::BuildEmbedder(mc, &model).ok());
  return model;
}

std::shared_ptr<models::LossModuleImpl> Loss(const char* name) {
  LossConfig lc;
  lc.set_name(name);
  std::shared_ptr<models::LossModuleImpl> loss;
  EXPECT_TRUE(models::BuildLoss(lc, 16, 10, &loss).ok());
  return loss;
}

TEST(PipelinePartitionTest, EmbedderPartitionsExplicitMeasuredAndByParameters) {
  torch::manual_seed(1);
  models::Embedder model = SmallEmbedder();
  const int n = static_cast<int>(model->layers()->size());
  PipelineConfig pc;
  pc.set_stages(2);
  Partition p;
  // AUTO by measured time.
  ASSERT_TRUE(PartitionModel(pc, model->layers(), torch::randn({16, 1, 28, 28}), &p).ok());
  EXPECT_EQ(p.source, "measured time");
  ASSERT_EQ(p.layers_per_stage.size(), 2u);
  EXPECT_EQ(p.layers_per_stage[0] + p.layers_per_stage[1], n);
  ASSERT_EQ(p.ms.size(), 2u);
  EXPECT_GT(p.ms[0], 0);
  int64_t params = 0;
  for (const auto& t : model->parameters()) params += t.numel();
  EXPECT_EQ(p.parameters[0] + p.parameters[1], params);
  // Measuring left no trace: no gradient, the BatchNorm statistics unchanged.
  for (const auto& t : model->parameters()) EXPECT_FALSE(t.grad().defined());
  torch::manual_seed(1);
  models::Embedder fresh = SmallEmbedder();
  const auto fresh_buffers = fresh->named_buffers();
  for (const auto& b : model->named_buffers()) EXPECT_TRUE(torch::equal(b.value(), fresh_buffers[b.key()])) << b.key();
  const std::string table = DescribePartition(p);
  EXPECT_THAT(table, HasSubstr("pipeline partition (measured time)"));
  EXPECT_THAT(table, HasSubstr("fwd+bwd ms"));
  // By parameter count without a sample.
  ASSERT_TRUE(PartitionModel(pc, model->layers(), torch::Tensor(), &p).ok());
  EXPECT_EQ(p.source, "parameter count");
  EXPECT_TRUE(p.ms.empty());
  // Explicit, and its errors naming the field.
  pc.add_layers_per_stage(1);
  pc.add_layers_per_stage(n - 1);
  ASSERT_TRUE(PartitionModel(pc, model->layers(), torch::Tensor(), &p).ok());
  EXPECT_EQ(p.source, "explicit");
  EXPECT_EQ(p.begin(1), 1);
  EXPECT_EQ(p.end(1), n);
  pc.set_layers_per_stage(1, n);
  EXPECT_THAT(PartitionModel(pc, model->layers(), torch::Tensor(), &p).message(),
              HasSubstr("parallelism.pipeline.layers_per_stage adds up to " + std::to_string(n + 1)));
  pc.add_layers_per_stage(1);
  EXPECT_THAT(PartitionModel(pc, model->layers(), torch::Tensor(), &p).message(), HasSubstr("3 entries for 2 stages"));
}

// One stage, uneven micro-batches (10 = 4 + 3 + 3): the accumulated gradient
// is the full batch's mean gradient. BatchNorm in eval mode makes samples
// independent, so the full batch is the exact reference; scaling each
// micro-batch's loss by 1/M would be off by 4/3 and 3/3 x (3/10 vs 1/3).
TEST(PipelineExecutionTest, UnevenMicroBatchesGiveTheMeanGradientOfTheMiniBatch) {
  torch::manual_seed(3);
  models::Embedder model = SmallEmbedder();
  model->eval();
  std::shared_ptr<models::LossModuleImpl> loss = Loss("arcface");
  const torch::Tensor x = torch::randn({10, 1, 28, 28});
  const torch::Tensor y = torch::randint(0, 10, {10}, torch::kInt64);
  std::vector<torch::Tensor> params = model->parameters();
  for (const auto& p : loss->parameters()) params.push_back(p);

  // Reference: the whole batch at once.
  for (auto& p : params) p.mutable_grad() = torch::Tensor();
  loss->Compute(model->forward(x), y).loss.backward();
  std::vector<torch::Tensor> reference;
  for (auto& p : params) reference.push_back(p.grad().clone());

  for (auto& p : params) p.mutable_grad() = torch::Tensor();
  StageOptions o;
  o.micro_batches = 3;
  StageExecutor exec(model->SliceLayers(0, static_cast<int64_t>(model->layers()->size())), nullptr, o);
  StageStats stats;
  const Status st = exec.RunMiniBatch(x, y, 10, [&](const torch::Tensor& out, const torch::Tensor& labels) {
    return loss->Compute(out, labels).loss;
  }, &stats);
  ASSERT_TRUE(st.ok()) << st;
  for (size_t i = 0; i < params.size(); ++i) {
    ASSERT_TRUE(params[i].grad().defined());
    EXPECT_TRUE(torch::allclose(params[i].grad(), reference[i], 1e-5, 1e-6)) << "parameter " << i;
  }
  EXPECT_EQ(stats.peak_in_flight, 1);
  EXPECT_GT(stats.loss, 0);
  // A batch smaller than the micro-batch count is refused.
  EXPECT_FALSE(exec.RunMiniBatch(x.narrow(0, 0, 2), y.narrow(0, 0, 2), 2,
                                 [&](const torch::Tensor& out, const torch::Tensor& labels) {
                                   return loss->Compute(out, labels).loss;
                                 },
                                 &stats)
                   .ok());
}

// GPipe with a loss over the whole mini-batch (the triplet miner sees every
// sample): the gradient equals the full batch's, which per-micro-batch
// mining would not give (it finds fewer, different triplets).
TEST(PipelineExecutionTest, WholeBatchTripletLossUnderGPipeEqualsTheFullBatch) {
  torch::manual_seed(4);
  models::Embedder model = SmallEmbedder();
  model->eval();
  std::shared_ptr<models::LossModuleImpl> loss = Loss("triplet");
  const torch::Tensor x = torch::randn({12, 1, 28, 28});
  const torch::Tensor y = torch::arange(12, torch::kInt64).floor_divide(4);  // 3 classes x 4
  std::vector<torch::Tensor> params = model->parameters();
  auto micro_loss = [&](const torch::Tensor& out, const torch::Tensor& labels) {
    return loss->Compute(out, labels).loss;
  };
  loss->Compute(model->forward(x), y).loss.backward();
  std::vector<torch::Tensor> reference;
  for (auto& p : params) reference.push_back(p.grad().clone());

  for (auto& p : params) p.mutable_grad() = torch::Tensor();
  StageOptions o;
  o.micro_batches = 3;
  o.schedule = PipelineConfig::GPIPE;
  o.whole_batch_loss = true;
  StageExecutor exec(model->SliceLayers(0, static_cast<int64_t>(model->layers()->size())), nullptr, o);
  StageStats stats;
  ASSERT_TRUE(exec.RunMiniBatch(x, y, 12, micro_loss, &stats).ok());
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(torch::allclose(params[i].grad(), reference[i], 1e-5, 1e-6)) << "parameter " << i;
  }
  EXPECT_EQ(stats.peak_in_flight, 3);
  // 1F1B cannot: it backwards micro-batch 0 before the last is forwarded.
  o.schedule = PipelineConfig::ONE_F_ONE_B;
  StageExecutor refused(model->SliceLayers(0, static_cast<int64_t>(model->layers()->size())), nullptr, o);
  EXPECT_THAT(refused.RunMiniBatch(x, y, 12, micro_loss, &stats).message(), HasSubstr("needs the GPIPE schedule"));
}

}  // namespace
}  // namespace dtrain::worker::pipeline
