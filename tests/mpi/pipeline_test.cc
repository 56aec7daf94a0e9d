// The pipeline engine on real ranks: the world's ranks are the stages of one
// pipeline (2 or 3 under ctest). For GPipe and 1F1B, with even and uneven
// micro-batches, every stage's gradients must equal those of the same
// micro-batches run one after the other through the whole model on one
// process, with the same per-sample scaling, and its BatchNorm running
// statistics those of one non-pipelined forward of the whole mini-batch
// (deferred BatchNorm: exactly for the first layer, whose inputs are the
// same, closely for the deeper ones); the references are computed on every
// rank, in-process. 1F1B must
// keep at most S - s micro-batches of activations alive on stage s.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "dtrain/models/registry.h"
#include "dtrain/worker/collective/mpi_collective.h"
#include "dtrain/worker/pipeline.h"

namespace dtrain::worker::pipeline {
namespace {

struct Model {
  models::Embedder net{nullptr};
  std::shared_ptr<models::LossModuleImpl> loss;
};

Model MakeModel() {
  torch::manual_seed(11);
  ModelConfig mc;
  mc.set_name("resnet_embedder");
  mc.set_embedding_dim(16);
  mc.add_widths(8);
  mc.add_widths(16);
  Model m;
  EXPECT_TRUE(models::BuildEmbedder(mc, &m.net).ok());
  LossConfig lc;
  lc.set_name("arcface");
  EXPECT_TRUE(models::BuildLoss(lc, 16, 10, &m.loss).ok());
  return m;
}

// This rank's stage of a parameter-balanced cut of `m` over the ranks of `comm`.
struct Staged {
  Partition part;
  StageOptions options;
};
Staged CutForThisRank(Model& m, const collective::Collective& comm, int micro_batches,
                      PipelineConfig::Schedule schedule) {
  Staged s;
  PipelineConfig pc;
  pc.set_stages(comm.size());
  EXPECT_TRUE(PartitionModel(pc, m.net->layers(), torch::Tensor(), &s.part).ok());
  StageOptions& o = s.options;
  o.stage = comm.rank();
  o.stages = comm.size();
  o.prev_rank = o.stage - 1;
  o.next_rank = o.stage + 1 < o.stages ? o.stage + 1 : -1;
  o.micro_batches = micro_batches;
  o.schedule = schedule;
  return s;
}

struct Case {
  PipelineConfig::Schedule schedule;
  int64_t batch;
  int micro_batches;
};

class PipelineRanksTest : public ::testing::TestWithParam<Case> {};

TEST_P(PipelineRanksTest, StagesEqualTheSameMicroBatchesThroughTheWholeModel) {
  const Case c = GetParam();
  collective::MpiCollectiveOptions co;
  co.timeout = std::chrono::seconds(60);
  std::unique_ptr<collective::MpiCollective> comm;
  ASSERT_TRUE(collective::MpiCollective::Create(co, &comm).ok());
  const int stages = comm->size(), stage = comm->rank();

  torch::manual_seed(5);
  const torch::Tensor x = torch::randn({c.batch, 1, 28, 28});
  const torch::Tensor y = torch::randint(0, 10, {c.batch}, torch::kInt64);

  // The reference: the micro-batches one after the other, scaled n_i / B.
  Model ref = MakeModel();
  const std::vector<int64_t> sizes = MicroBatchSizes(c.batch, c.micro_batches);
  int64_t at = 0;
  for (int64_t n : sizes) {
    torch::Tensor l = ref.loss->Compute(ref.net->forward(x.narrow(0, at, n)), y.narrow(0, at, n)).loss;
    (l * (static_cast<double>(n) / static_cast<double>(c.batch))).backward();
    at += n;
  }

  // The running statistics one non-pipelined forward of the mini-batch
  // leaves (deferred BatchNorm).
  Model full = MakeModel();
  {
    torch::NoGradGuard no_grad;
    full.net->forward(x);
  }

  // The pipeline: this rank holds stage `stage` of a parameter-balanced cut.
  Model m = MakeModel();
  const Staged cut = CutForThisRank(m, *comm, c.micro_batches, c.schedule);
  const Partition& part = cut.part;
  StageExecutor exec(m.net->SliceLayers(part.begin(stage), part.end(stage)), comm.get(), cut.options);
  StageStats stats;
  const Status st = exec.RunMiniBatch(stage == 0 ? x : torch::Tensor(), y, c.batch,
                                      [&](const torch::Tensor& out, const torch::Tensor& labels) {
                                        return m.loss->Compute(out, labels).loss;
                                      },
                                      &stats);
  ASSERT_TRUE(st.ok()) << st;

  // This stage's parameters and buffers against the reference's.
  const auto ref_params = ref.net->named_parameters();
  const auto full_buffers = full.net->named_buffers();
  int compared = 0;
  for (const auto& p : m.net->named_parameters()) {
    // "layers.<i>...." belongs to stage s when begin <= i < end.
    const int layer = std::stoi(p.key().substr(7, p.key().find('.', 7) - 7));
    if (layer < part.begin(stage) || layer >= part.end(stage)) continue;
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_TRUE(torch::allclose(p.value().grad(), ref_params[p.key()].grad(), 1e-4, 1e-6))
        << p.key() << " on stage " << stage;
    ++compared;
  }
  for (const auto& b : m.net->named_buffers()) {
    const int layer = std::stoi(b.key().substr(7, b.key().find('.', 7) - 7));
    if (layer < part.begin(stage) || layer >= part.end(stage)) continue;
    // The first layer's BatchNorm sees the same inputs in both: its running
    // statistics must agree to float precision (this checks the combination
    // of the micro-batches' statistics, spatial counts included). Deeper
    // ones see inputs normalised with micro-batch statistics upstream, so
    // they agree only closely. num_batches_tracked advances by one.
    const bool first_layer = layer == 0;
    EXPECT_TRUE(torch::allclose(b.value().to(torch::kDouble), full_buffers[b.key()].to(torch::kDouble),
                                first_layer ? 1e-5 : 5e-2, first_layer ? 1e-6 : 1e-3))
        << b.key() << " on stage " << stage << ": " << b.value() << " vs " << full_buffers[b.key()];
  }
  EXPECT_GT(compared, 0);
  if (stage == stages - 1) {
    const auto ref_loss = ref.loss->named_parameters();
    for (const auto& p : m.loss->named_parameters()) {
      EXPECT_TRUE(torch::allclose(p.value().grad(), ref_loss[p.key()].grad(), 1e-4, 1e-6)) << "loss " << p.key();
    }
    EXPECT_GT(stats.loss, 0);
  }
  const int bound = c.schedule == PipelineConfig::GPIPE ? c.micro_batches : std::min(stages - stage, c.micro_batches);
  EXPECT_EQ(stats.peak_in_flight, bound) << "stage " << stage;
}

INSTANTIATE_TEST_SUITE_P(Schedules, PipelineRanksTest,
                         ::testing::Values(Case{PipelineConfig::GPIPE, 16, 4}, Case{PipelineConfig::ONE_F_ONE_B, 16, 4},
                                           Case{PipelineConfig::ONE_F_ONE_B, 14, 4},
                                           Case{PipelineConfig::GPIPE, 14, 5}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return std::string(info.param.schedule == PipelineConfig::GPIPE ? "GPipe" : "OneFOneB") +
                                  "_B" + std::to_string(info.param.batch) + "_M" +
                                  std::to_string(info.param.micro_batches);
                         });

// Five SGD steps (momentum, weight decay): every stage's parameters equal
// single-process training with the same micro-batches (gradient
// accumulation, the same n_i / B scaling), within 1e-5 relative. That is
// the configuration where equality holds: with M > 1 the BatchNorm of a
// micro-batch normalises with its own statistics in both; against one
// full-batch step it holds for M = 1 (M = 1 is among the cases).
class PipelineStepsTest : public ::testing::TestWithParam<std::tuple<PipelineConfig::Schedule, int>> {};

TEST_P(PipelineStepsTest, ParametersAfterFiveStepsEqualSingleProcessTraining) {
  const auto [schedule, micro] = GetParam();
  collective::MpiCollectiveOptions co;
  co.timeout = std::chrono::seconds(60);
  std::unique_ptr<collective::MpiCollective> comm;
  ASSERT_TRUE(collective::MpiCollective::Create(co, &comm).ok());
  const int stage = comm->rank();
  const int64_t batch = 16;
  auto optimizer = [](Model& m) {
    std::vector<torch::Tensor> p = m.net->parameters();
    for (const auto& t : m.loss->parameters()) p.push_back(t);
    return std::make_unique<torch::optim::SGD>(p, torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(5e-4));
  };
  Model ref = MakeModel(), m = MakeModel();
  auto ref_opt = optimizer(ref), opt = optimizer(m);
  const Staged cut = CutForThisRank(m, *comm, micro, schedule);
  const Partition& part = cut.part;
  StageExecutor exec(m.net->SliceLayers(part.begin(stage), part.end(stage)), comm.get(), cut.options);
  for (int step = 0; step < 5; ++step) {
    torch::manual_seed(100 + step);
    const torch::Tensor x = torch::randn({batch, 1, 28, 28});
    const torch::Tensor y = torch::randint(0, 10, {batch}, torch::kInt64);
    ref_opt->zero_grad();
    int64_t at = 0;
    for (int64_t n : MicroBatchSizes(batch, micro)) {
      torch::Tensor l = ref.loss->Compute(ref.net->forward(x.narrow(0, at, n)), y.narrow(0, at, n)).loss;
      (l * (static_cast<double>(n) / static_cast<double>(batch))).backward();
      at += n;
    }
    ref_opt->step();
    opt->zero_grad();
    StageStats stats;
    const Status st = exec.RunMiniBatch(x, y, batch, [&](const torch::Tensor& e, const torch::Tensor& l) {
      return m.loss->Compute(e, l).loss;
    }, &stats);
    ASSERT_TRUE(st.ok()) << st;
    opt->step();  // only this stage's parameters have gradients
  }
  const auto ref_params = ref.net->named_parameters();
  int compared = 0;
  for (const auto& p : m.net->named_parameters()) {
    const int layer = std::stoi(p.key().substr(7, p.key().find('.', 7) - 7));
    if (layer < part.begin(stage) || layer >= part.end(stage)) continue;
    const torch::Tensor& want = ref_params[p.key()];
    const double rel = (p.value() - want).norm().item<double>() / std::max(want.norm().item<double>(), 1e-12);
    EXPECT_LT(rel, 1e-5) << p.key() << " on stage " << stage;
    ++compared;
  }
  EXPECT_GT(compared, 0);
}

INSTANTIATE_TEST_SUITE_P(
    Schedules, PipelineStepsTest,
    ::testing::Combine(::testing::Values(PipelineConfig::GPIPE, PipelineConfig::ONE_F_ONE_B), ::testing::Values(1, 4)),
    [](const ::testing::TestParamInfo<std::tuple<PipelineConfig::Schedule, int>>& info) {
      return std::string(std::get<0>(info.param) == PipelineConfig::GPIPE ? "GPipe" : "OneFOneB") + "_M" +
             std::to_string(std::get<1>(info.param));
    });

// Stages that disagree on the mini-batch: the receiving stage names the
// micro-batch and both sizes; the sender, its activation never taken, times
// out naming it. Neither hangs.
TEST(PipelineErrorsTest, MismatchedShapesGiveAClearErrorNotAHang) {
  collective::MpiCollectiveOptions co;
  co.timeout = std::chrono::seconds(3);
  std::unique_ptr<collective::MpiCollective> comm;
  ASSERT_TRUE(collective::MpiCollective::Create(co, &comm).ok());
  const int stage = comm->rank();
  Model m = MakeModel();
  const Staged cut = CutForThisRank(m, *comm, 1, PipelineConfig::GPIPE);
  StageExecutor exec(m.net->SliceLayers(cut.part.begin(stage), cut.part.end(stage)), comm.get(), cut.options);
  // Stage 0 sends micro-batches of 8; every later stage expects 6.
  const int64_t batch = stage == 0 ? 8 : 6;
  const torch::Tensor x = torch::randn({batch, 1, 28, 28});
  const torch::Tensor y = torch::randint(0, 10, {batch}, torch::kInt64);
  StageStats stats;
  const Status st = exec.RunMiniBatch(x, y, batch, [&](const torch::Tensor& e, const torch::Tensor& l) {
    return m.loss->Compute(e, l).loss;
  }, &stats);
  ASSERT_FALSE(st.ok());
  if (stage == 1) {
    EXPECT_EQ(st.code(), Status::Code::kCorruption);
    EXPECT_THAT(st.message(), ::testing::HasSubstr("stage 1: micro-batch 0 arrives with 8 samples, expected 6"));
  } else if (stage == 0) {
    // Its activation was never taken, or its gradient never came: either
    // way the timeout names the micro-batch and the neighbour.
    EXPECT_THAT(st.message(), ::testing::HasSubstr("micro-batch 0"));
    EXPECT_THAT(st.message(), ::testing::HasSubstr("stage 1"));
    EXPECT_THAT(st.message(), ::testing::HasSubstr("within 3.0 s"));
  }
}

}  // namespace
}  // namespace dtrain::worker::pipeline
