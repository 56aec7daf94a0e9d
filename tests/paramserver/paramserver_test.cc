// The shard plan and the server-side optimizers (checked against LibTorch's
// optimizers, which the trainer uses in sync mode).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <map>
#include <random>
#include <thread>

#include "dtrain/paramserver/shard.h"

#include <grpcpp/grpcpp.h>

#include <limits>

#include "dtrain/common/half.h"
#include "dtrain/common/rpc.h"
#include "dtrain/paramserver.grpc.pb.h"
#include "dtrain/paramserver/optimizer.h"
#include "dtrain/paramserver/service.h"
#include "dtrain/paramserver/wire.h"
#include "dtrain/paramserver/wire_codec.h"
#include "dtrain/paramserver/sharding.h"

namespace dtrain::paramserver {
namespace {

using ::testing::HasSubstr;

std::vector<ParamSpec> ResnetLikeParams() {
  // Sizes of the default embedder's tensors, plus an ArcFace class weight.
  std::vector<ParamSpec> p;
  const std::vector<std::pair<const char*, int64_t>> sizes = {
      {"layers.0.conv.weight", 288},      {"layers.0.bn.weight", 32},        {"layers.0.bn.bias", 32},
      {"layers.1.conv1.weight", 18432},   {"layers.1.conv2.weight", 36864},  {"layers.1.bn1.weight", 64},
      {"layers.2.conv1.weight", 73728},   {"layers.2.conv2.weight", 147456}, {"layers.2.bn1.weight", 128},
      {"layers.3.fc.weight", 16384},      {"layers.3.fc.bias", 128},         {"loss.weight", 1280},
  };
  for (auto [n, k] : sizes) p.push_back({n, k, 4});
  return p;
}

TEST(ShardingTest, EveryElementOnceBalancedAndOrderIndependent) {
  const std::vector<ParamSpec> params = ResnetLikeParams();
  for (int shards : {1, 2, 3, 4}) {
    SCOPED_TRACE(shards);
    ShardPlan plan;
    ASSERT_TRUE(PlanShards(params, shards, &plan).ok());
    ASSERT_EQ(plan.shards.size(), static_cast<size_t>(shards));
    // Coverage: each tensor's slices tile [0, numel) exactly once.
    std::map<std::string, std::vector<std::pair<int64_t, int64_t>>> covered;
    for (const auto& slices : plan.shards) {
      for (const ParamSlice& s : slices) covered[s.name].emplace_back(s.offset, s.length);
    }
    for (const ParamSpec& p : params) {
      auto& v = covered[p.name];
      std::sort(v.begin(), v.end());
      int64_t next = 0;
      for (auto [off, len] : v) {
        EXPECT_EQ(off, next) << p.name;
        EXPECT_GT(len, 0);
        next = off + len;
      }
      EXPECT_EQ(next, p.numel) << p.name;
    }
    // Balance: the largest conv weight alone is half the model; splitting
    // keeps every shard within 5% of the mean (the bound is 25%).
    EXPECT_LE(plan.Imbalance(), 1.05);
    // The same plan whatever order the parameters come in.
    std::vector<ParamSpec> shuffled = params;
    std::mt19937 rng(3);
    std::shuffle(shuffled.begin(), shuffled.end(), rng);
    ShardPlan again;
    ASSERT_TRUE(PlanShards(shuffled, shards, &again).ok());
    for (int s = 0; s < shards; ++s) {
      ASSERT_EQ(again.shards[s].size(), plan.shards[s].size());
      for (size_t i = 0; i < plan.shards[s].size(); ++i) {
        EXPECT_EQ(again.shards[s][i].name, plan.shards[s][i].name);
        EXPECT_EQ(again.shards[s][i].offset, plan.shards[s][i].offset);
        EXPECT_EQ(again.shards[s][i].length, plan.shards[s][i].length);
      }
    }
  }
}

TEST(ShardingTest, BadInputIsRefused) {
  ShardPlan plan;
  EXPECT_EQ(PlanShards(ResnetLikeParams(), 0, &plan).code(), Status::Code::kInvalidArgument);
  Status st = PlanShards({{"a", 4, 4}, {"a", 8, 4}}, 2, &plan);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("'a' is listed twice"));
  EXPECT_EQ(PlanShards({{"", 4, 4}}, 2, &plan).code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(PlanShards({{"z", 0, 4}}, 2, &plan).code(), Status::Code::kInvalidArgument);
  // More shards than elements: some shards are empty, nothing breaks.
  ASSERT_TRUE(PlanShards({{"tiny", 2, 4}}, 4, &plan).ok());
  int64_t total = 0;
  for (int64_t b : plan.shard_bytes) total += b;
  EXPECT_EQ(total, 8);
}

// Runs `steps` updates with the server optimizer (on two slices of one
// tensor, as a split tensor is updated on two shards) and with LibTorch's,
// on the same gradients and learning rates.
void ExpectSameAsTorch(const OptimizerConfig& config) {
  torch::manual_seed(5);
  const int64_t n = 1000;
  torch::Tensor p = torch::randn({n});
  std::vector<float> mine(p.data_ptr<float>(), p.data_ptr<float>() + n);
  torch::Tensor ref = p.clone().set_requires_grad(true);
  std::unique_ptr<torch::optim::Optimizer> opt;
  if (config.kind() == OptimizerConfig::ADAMW) {
    opt = std::make_unique<torch::optim::AdamW>(
        std::vector<torch::Tensor>{ref}, torch::optim::AdamWOptions(config.lr())
                                              .betas({config.beta1(), config.beta2()})
                                              .eps(config.eps())
                                              .weight_decay(config.weight_decay()));
  } else {
    opt = std::make_unique<torch::optim::SGD>(std::vector<torch::Tensor>{ref}, torch::optim::SGDOptions(config.lr())
                                                                                 .momentum(config.momentum())
                                                                                 .nesterov(config.nesterov())
                                                                                 .weight_decay(config.weight_decay()));
  }
  ServerOptimizer server;
  ASSERT_TRUE(ServerOptimizer::Create(config, &server).ok());
  SlotState a, b;  // the two slices [0, 600) and [600, 1000)
  for (int step = 0; step < 20; ++step) {
    const double lr = config.lr() * (1.0 - step / 40.0);  // a decaying schedule
    torch::Tensor g = torch::randn({n});
    for (auto& group : opt->param_groups()) group.options().set_lr(lr);
    ref.mutable_grad() = g.clone();
    opt->step();
    server.Apply(mine.data(), g.data_ptr<float>(), 600, lr, &a);
    server.Apply(mine.data() + 600, g.data_ptr<float>() + 600, 400, lr, &b);
  }
  const float* r = ref.data_ptr<float>();
  double max_diff = 0;
  for (int64_t i = 0; i < n; ++i) max_diff = std::max(max_diff, std::abs(double(mine[i]) - double(r[i])));
  EXPECT_LT(max_diff, 1e-5) << "after 20 steps";
  EXPECT_EQ(a.step, 20);
}

TEST(ServerOptimizerTest, SgdNesterovMatchesTorch) {
  OptimizerConfig c;
  c.set_kind(OptimizerConfig::SGD);
  c.set_lr(0.1f);
  c.set_momentum(0.9f);
  c.set_nesterov(true);
  c.set_weight_decay(5e-4f);
  ExpectSameAsTorch(c);
}

TEST(ServerOptimizerTest, SgdPlainMomentumMatchesTorch) {
  OptimizerConfig c;
  c.set_kind(OptimizerConfig::SGD);
  c.set_lr(0.05f);
  c.set_momentum(0.8f);
  c.set_nesterov(false);
  c.set_weight_decay(0);
  ExpectSameAsTorch(c);
}

TEST(ServerOptimizerTest, AdamWMatchesTorch) {
  OptimizerConfig c;
  c.set_kind(OptimizerConfig::ADAMW);
  c.set_lr(1e-3f);
  c.set_weight_decay(0.01f);
  ExpectSameAsTorch(c);
}

TEST(ServerOptimizerTest, BadSettingsAreNamedAndSlotsMatchCheckpointNames) {
  ServerOptimizer s;
  OptimizerConfig c;
  c.set_kind(OptimizerConfig::ADAMW);
  c.set_beta2(1.0f);
  Status st = ServerOptimizer::Create(c, &s);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("optimizer.beta2"));
  c.set_beta2(0.999f);
  ASSERT_TRUE(ServerOptimizer::Create(c, &s).ok());
  EXPECT_EQ(s.SlotNames(), (std::vector<std::string>{"exp_avg", "exp_avg_sq", "step"}));
  OptimizerConfig sgd;
  sgd.set_nesterov(false);
  sgd.set_lr(-1);
  EXPECT_THAT(ServerOptimizer::Create(sgd, &s).message(), HasSubstr("optimizer.lr"));
  sgd.set_lr(0.1f);
  ASSERT_TRUE(ServerOptimizer::Create(sgd, &s).ok());
  EXPECT_EQ(s.SlotNames(), (std::vector<std::string>{"momentum_buffer"}));
}

}  // namespace
}  // namespace dtrain::paramserver

namespace dtrain::paramserver {
namespace {

// Two shards of a plan over two tensors; values start at 1.0.
struct TwoShards {
  ShardPlan plan;
  std::vector<std::unique_ptr<ParameterShard>> shards;
  std::map<std::string, std::vector<float>> init;

  explicit TwoShards(const ShardOptions& base, const std::vector<ParamSpec>& params = {{"w", 600, 4}, {"b", 40, 4}}) {
    EXPECT_TRUE(PlanShards(params, 2, &plan).ok());
    for (const ParamSpec& p : params) init[p.name].assign(static_cast<size_t>(p.numel), 1.0f);
    for (int s = 0; s < 2; ++s) {
      ShardOptions o = base;
      o.shard = s;
      o.slices = plan.shards[s];
      std::unique_ptr<ParameterShard> shard;
      EXPECT_TRUE(ParameterShard::Create(o, &shard).ok());
      std::vector<SliceView> views;
      for (const ParamSlice& sl : plan.shards[s]) views.push_back({sl.name, sl.offset, sl.length, init[sl.name].data() + sl.offset});
      EXPECT_TRUE(shard->Initialize(views, 0).ok());
      shards.push_back(std::move(shard));
    }
  }
  // The gradient views of shard s, taken from full per-tensor gradients.
  std::vector<SliceView> Grads(int s, const std::map<std::string, std::vector<float>>& g) const {
    std::vector<SliceView> v;
    for (const ParamSlice& sl : plan.shards[s]) v.push_back({sl.name, sl.offset, sl.length, g.at(sl.name).data() + sl.offset});
    return v;
  }
  std::map<std::string, std::vector<float>> Values() const {
    std::map<std::string, std::vector<float>> out = init;
    for (const auto& sh : shards) {
      std::vector<SliceValues> vals;
      int64_t version = 0;
      EXPECT_TRUE(sh->Pull(-1, &vals, &version).ok());
      for (const SliceValues& v : vals) std::copy(v.data.begin(), v.data.end(), out[v.name].begin() + v.offset);
    }
    return out;
  }
};

// A gradient of normally distributed values for every tensor of `params`.
std::map<std::string, std::vector<float>> RandomGradients(const std::vector<ParamSpec>& params, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::map<std::string, std::vector<float>> g;
  for (const ParamSpec& p : params) {
    auto& v = g[p.name];
    v.resize(static_cast<size_t>(p.numel));
    for (float& x : v) x = normal(rng);
  }
  return g;
}

ShardOptions SgdOptions(int max_staleness) {
  ShardOptions o;
  o.optimizer.set_kind(OptimizerConfig::SGD);
  o.optimizer.set_lr(0.1f);
  o.optimizer.set_momentum(0.9f);
  o.optimizer.set_nesterov(true);
  o.optimizer.set_weight_decay(5e-4f);
  o.max_staleness = max_staleness;
  o.lr_at = [](int64_t v) { return 0.1 / (1.0 + 0.1 * v); };  // a schedule by global step
  return o;
}

TEST(ParameterShardTest, SequentialPushesEqualLocalTraining) {
  // tau = 0, one worker: every push is computed on the current version, and
  // the shards together equal LibTorch's SGD on the whole tensors.
  TwoShards ps(SgdOptions(0));
  torch::manual_seed(11);
  torch::Tensor w = torch::ones({600}).set_requires_grad(true), b = torch::ones({40}).set_requires_grad(true);
  torch::optim::SGD sgd({w, b}, torch::optim::SGDOptions(0.1).momentum(0.9).nesterov(true).weight_decay(5e-4));
  for (int step = 0; step < 10; ++step) {
    torch::Tensor gw = torch::randn({600}), gb = torch::randn({40});
    std::map<std::string, std::vector<float>> g = {
        {"w", std::vector<float>(gw.data_ptr<float>(), gw.data_ptr<float>() + 600)},
        {"b", std::vector<float>(gb.data_ptr<float>(), gb.data_ptr<float>() + 40)}};
    for (auto& group : sgd.param_groups()) group.options().set_lr(0.1 / (1.0 + 0.1 * step));
    w.mutable_grad() = gw;
    b.mutable_grad() = gb;
    sgd.step();
    for (int s = 0; s < 2; ++s) {
      PushResult r;
      ASSERT_TRUE(ps.shards[s]->Push(step, ps.Grads(s, g), &r).ok());
      EXPECT_EQ(r.version, step + 1);
      EXPECT_EQ(r.staleness, 0);
    }
  }
  const auto values = ps.Values();
  for (int64_t i = 0; i < 600; ++i) EXPECT_NEAR(values.at("w")[i], w.data_ptr<float>()[i], 1e-5) << i;
  for (int64_t i = 0; i < 40; ++i) EXPECT_NEAR(values.at("b")[i], b.data_ptr<float>()[i], 1e-5) << i;
}

TEST(ParameterShardTest, StalenessBoundIsEnforcedAndCounted) {
  TwoShards ps(SgdOptions(2));
  std::map<std::string, std::vector<float>> g = {{"w", std::vector<float>(600, 0.5f)}, {"b", std::vector<float>(40, 0.5f)}};
  ParameterShard& s0 = *ps.shards[0];
  PushResult r;
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(s0.Push(i, ps.Grads(0, g), &r).ok());  // version 3
  const auto before = ps.Values();
  // Computed on version 0: 3 updates stale > 2: refused, nothing changes.
  Status st = s0.Push(0, ps.Grads(0, g), &r);
  EXPECT_EQ(st.code(), Status::Code::kAborted);
  EXPECT_THAT(st.message(), HasSubstr("3 updates stale"));
  EXPECT_EQ(s0.version(), 3);
  EXPECT_EQ(ps.Values(), before);
  // Computed on version 1: 2 stale, within the bound.
  ASSERT_TRUE(s0.Push(1, ps.Grads(0, g), &r).ok());
  EXPECT_EQ(r.staleness, 2);
  const ShardCounters c = s0.counters();
  EXPECT_EQ(c.applied, 4);
  EXPECT_EQ(c.rejected_stale, 1);
  EXPECT_EQ(c.staleness_histogram.at(0), 3);
  EXPECT_EQ(c.staleness_histogram.at(2), 1);
  // Pull since version 3 returns only what changed after it.
  std::vector<SliceValues> changed;
  int64_t version = 0;
  ASSERT_TRUE(s0.Pull(4, &changed, &version).ok());
  EXPECT_TRUE(changed.empty());
  EXPECT_EQ(version, 4);
  ASSERT_TRUE(s0.Pull(3, &changed, &version).ok());
  EXPECT_EQ(changed.size(), ps.plan.shards[0].size());
}

TEST(ParameterShardTest, MalformedPushesChangeNothing) {
  ShardOptions o = SgdOptions(10);
  TwoShards ps(o);
  ParameterShard& s0 = *ps.shards[0];
  const auto before = ps.Values();
  const ParamSlice first = ps.plan.shards[0][0];
  std::vector<float> grad(static_cast<size_t>(first.length) + 5, 0.1f);
  PushResult r;
  auto expect_refused = [&](std::vector<SliceView> views, const char* text) {
    Status st = s0.Push(0, views, &r);
    EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << text;
    EXPECT_THAT(st.message(), HasSubstr(text));
  };
  expect_refused({{"nope", 0, 4, grad.data()}}, "holds no slice 'nope'");
  expect_refused({{first.name, first.offset, first.length + 5, grad.data()}}, "elements");
  expect_refused({{first.name, first.offset, first.length, grad.data()}, {first.name, first.offset, first.length, grad.data()}},
                 "appears twice");
  grad[3] = std::nanf("");
  expect_refused({{first.name, first.offset, first.length, grad.data()}}, "not finite at element");
  expect_refused({{first.name, first.offset, first.length, grad.data()}}, "NONFINITE_REJECT");
  EXPECT_EQ(s0.version(), 0);
  EXPECT_EQ(ps.Values(), before);
  EXPECT_EQ(s0.counters().rejected_invalid, 5);
  // The skip policy drops the push and counts it.
  o.nonfinite_policy = AsyncConfig::NONFINITE_SKIP;
  TwoShards skip(o);
  ASSERT_TRUE(skip.shards[0]->Push(0, {{first.name, first.offset, first.length, grad.data()}}, &r).ok());
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(skip.shards[0]->version(), 0);
  EXPECT_EQ(skip.shards[0]->counters().skipped_nonfinite, 1);
  EXPECT_EQ(skip.Values(), skip.init);
  // Initialising with a partial set of slices is refused too.
  EXPECT_EQ(s0.Initialize({}, 0).code(), Status::Code::kInvalidArgument);
}

// The bytes of `v` cut into pieces of the given sizes, in turn (odd sizes put
// element boundaries inside pieces and split elements between two).
std::vector<std::pair<const uint8_t*, size_t>> CutIntoPieces(const std::vector<float>& v, const std::vector<size_t>& sizes) {
  std::vector<std::pair<const uint8_t*, size_t>> pieces;
  const auto* p = reinterpret_cast<const uint8_t*>(v.data());
  size_t left = v.size() * sizeof(float);
  for (size_t i = 0; left > 0; ++i) {
    const size_t n = std::min(left, sizes[i % sizes.size()]);
    pieces.emplace_back(p, n);
    p += n;
    left -= n;
  }
  return pieces;
}

TEST(ParameterShardTest, PushesInPiecesEqualPushesInOnePiece) {
  // The service applies gradients straight from the received buffers, whose
  // boundaries fall anywhere; the result must not depend on them.
  TwoShards whole(SgdOptions(10)), cut(SgdOptions(10));
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  for (int step = 0; step < 4; ++step) {
    std::map<std::string, std::vector<float>> g;
    for (const char* name : {"w", "b"}) {
      auto& v = g[name];
      v.resize(std::string(name) == "w" ? 600 : 40);
      for (float& x : v) x = normal(rng);
    }
    for (int s = 0; s < 2; ++s) {
      PushResult r;
      ASSERT_TRUE(whole.shards[s]->Push(step, whole.Grads(s, g), &r).ok());
      std::vector<SliceView> views = cut.Grads(s, g);
      std::vector<std::vector<float>> copies;
      copies.reserve(views.size());
      for (SliceView& v : views) {
        copies.emplace_back(v.data, v.data + v.length);
        v.data = nullptr;
        v.pieces = CutIntoPieces(copies.back(), {7, 1, 130, 4, 65539});
      }
      ASSERT_TRUE(cut.shards[s]->Push(step, views, &r).ok());
    }
  }
  EXPECT_EQ(cut.Values(), whole.Values());
  // A non-finite element split between two pieces is found, and named.
  const ParamSlice first = cut.plan.shards[0][0];
  std::vector<float> grad(static_cast<size_t>(first.length), 0.5f);
  grad[9] = std::numeric_limits<float>::infinity();
  SliceView v{first.name, first.offset, first.length, nullptr, "", CutIntoPieces(grad, {38, 7})};
  PushResult r;
  Status st = cut.shards[0]->Push(cut.shards[0]->version(), {v}, &r);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("not finite at element " + std::to_string(first.offset + 9)));
  // Pieces that do not add up to the slice are refused.
  const std::vector<float> short_grad(static_cast<size_t>(first.length) - 1, 0.5f);
  v.pieces = CutIntoPieces(short_grad, {64});
  EXPECT_THAT(cut.shards[0]->Push(cut.shards[0]->version(), {v}, &r).message(), HasSubstr("bytes of data for"));
}

TEST(ParameterShardTest, LargePushesAppliedBySeveralThreadsEqualOneThread) {
  // A push of at least kParallelApplyBytes is applied by apply_threads
  // threads, its slices split between them: the values, the optimizer state
  // and the versions are what one thread gives, bit for bit, for SGD and
  // AdamW, with the slices split unevenly.
  const std::vector<ParamSpec> params = {
      {"a", 700000, 4}, {"b", 300000, 4}, {"c", 500000, 4}, {"d", 10, 4}, {"e", 900000, 4}};
  for (const bool adamw : {false, true}) {
    ShardOptions base = SgdOptions(10);
    if (adamw) base.optimizer.set_kind(OptimizerConfig::ADAMW);
    ShardOptions one = base, three = base;
    one.apply_threads = 1;
    three.apply_threads = 3;
    TwoShards a(one, params), b(three, params);
    for (const ParamSlice& sl : a.plan.shards[0]) ASSERT_GT(sl.length, 0);
    int64_t shard0_bytes = 0;
    for (const ParamSlice& sl : a.plan.shards[0]) shard0_bytes += 4 * sl.length;
    ASSERT_GE(shard0_bytes, kParallelApplyBytes);  // the threaded path runs
    std::mt19937 rng(11);
    for (int step = 0; step < 3; ++step) {
      const std::map<std::string, std::vector<float>> g = RandomGradients(params, rng);
      for (int s = 0; s < 2; ++s) {
        PushResult ra, rb;
        ASSERT_TRUE(a.shards[s]->Push(step, a.Grads(s, g), &ra).ok());
        ASSERT_TRUE(b.shards[s]->Push(step, b.Grads(s, g), &rb).ok());
        EXPECT_EQ(ra.version, rb.version);
      }
    }
    EXPECT_EQ(a.Values(), b.Values()) << (adamw ? "AdamW" : "SGD");
    for (int s = 0; s < 2; ++s) {
      std::map<std::string, std::vector<float>> sa, sb;
      int64_t va = 0, vb = 0, oa = 0, ob = 0;
      auto collect = [](std::map<std::string, std::vector<float>>* out) {
        return [out](const ParamSlice& sl, const std::string& slot, const float* x) {
          (*out)[sl.name + "/" + std::to_string(sl.offset) + "/" + slot].assign(x, x + sl.length);
        };
      };
      ASSERT_TRUE(a.shards[s]->VisitState(&va, &oa, collect(&sa)).ok());
      ASSERT_TRUE(b.shards[s]->VisitState(&vb, &ob, collect(&sb)).ok());
      EXPECT_EQ(va, vb);
      EXPECT_EQ(oa, ob);
      EXPECT_EQ(sa, sb) << "optimizer state of shard " << s;
    }
  }
  ShardOptions zero = SgdOptions(10);
  zero.apply_threads = 0;
  std::unique_ptr<ParameterShard> bad;
  EXPECT_THAT(ParameterShard::Create(zero, &bad).message(), HasSubstr("apply_threads must be >= 1"));
}

TEST(ParameterShardTest, APullInFlightKeepsTheValuesItRead) {
  // VisitChanged hands out the values without copying them; a push that
  // comes while a pull still holds them writes elsewhere (copy on write).
  TwoShards ps(SgdOptions(10));
  ParameterShard& s0 = *ps.shards[0];
  std::map<std::string, std::shared_ptr<const float[]>> held;
  std::map<std::string, std::vector<float>> read;
  int64_t version = 0;
  ASSERT_TRUE(s0.VisitChanged(-1, &version, [&](const ParamSlice& s, const float* v, const std::shared_ptr<const float[]>& owner) {
    EXPECT_EQ(v, owner.get());
    held[s.name] = owner;
    read[s.name].assign(v, v + s.length);
  }).ok());
  std::map<std::string, std::vector<float>> g = {{"w", std::vector<float>(600, 0.25f)}, {"b", std::vector<float>(40, 0.25f)}};
  PushResult r;
  ASSERT_TRUE(s0.Push(0, ps.Grads(0, g), &r).ok());
  ASSERT_TRUE(s0.Push(1, ps.Grads(0, g), &r).ok());
  for (const ParamSlice& sl : ps.plan.shards[0]) {
    const float* v = held.at(sl.name).get();
    EXPECT_EQ(std::vector<float>(v, v + sl.length), read.at(sl.name)) << sl.name << ": changed under a pull";
  }
  const auto after = ps.Values();
  for (const ParamSlice& sl : ps.plan.shards[0]) {
    EXPECT_NE(after.at(sl.name)[static_cast<size_t>(sl.offset)], read.at(sl.name)[0]) << sl.name << ": push not applied";
  }
  // The same two pushes on a shard nobody reads give the same values.
  TwoShards fresh(SgdOptions(10));
  ASSERT_TRUE(fresh.shards[0]->Push(0, fresh.Grads(0, g), &r).ok());
  ASSERT_TRUE(fresh.shards[0]->Push(1, fresh.Grads(0, g), &r).ok());
  const auto expected = fresh.Values();
  for (const ParamSlice& sl : ps.plan.shards[0]) {
    for (int64_t i = sl.offset; i < sl.offset + sl.length; ++i) {
      EXPECT_EQ(after.at(sl.name)[static_cast<size_t>(i)], expected.at(sl.name)[static_cast<size_t>(i)]);
    }
  }
}

TEST(WireCodecTest, ProtobufBytesWrittenAndReadWithoutCopies) {
  // A PushRequest written by WireBuilder is what protobuf writes, and
  // ParseWireMessage reads it back however the bytes are cut into slices.
  std::vector<float> data(1000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = 0.5f * static_cast<float>(i) - 3.0f;
  SlicePins pins;
  WireBuilder b;
  b.Int64(1, 42);  // base_version
  b.Int64(2, -1);  // worker (a negative int32)
  int64_t payload = 0;
  ChunkSliceToWire("layer.weight", 100, data.data(), 1000, COMPRESSION_NONE, 1600,
                   [&pins](const float* p, size_t n) { return pins.Wrap(p, n); },
                   [&](TensorChunk&& c, grpc::Slice&& d, int64_t n) {
                     payload += n;
                     b.Chunk(3, c, std::move(d));
                   });
  EXPECT_EQ(payload, 4000);
  grpc::ByteBuffer buffer = b.Finish();
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(buffer.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  // 1. Protobuf reads the same message.
  PushRequest pb;
  ASSERT_TRUE(pb.ParseFromString(bytes));
  EXPECT_EQ(pb.base_version(), 42);
  EXPECT_EQ(pb.worker(), -1);
  ASSERT_EQ(pb.chunks_size(), 3);  // 1,000 floats in chunks of 400
  EXPECT_EQ(pb.chunks(2).chunk_offset(), 800);
  EXPECT_EQ(pb.chunks(2).data().size(), 800u);
  // 2. Our parser, on the bytes cut into slices of awkward sizes.
  for (size_t cut : {size_t{1}, size_t{3}, size_t{7}, size_t{4096}, bytes.size()}) {
    std::vector<grpc::Slice> pieces;
    for (size_t at = 0; at < bytes.size(); at += cut) pieces.emplace_back(bytes.data() + at, std::min(cut, bytes.size() - at));
    WireMessage m;
    ASSERT_TRUE(ParseWireMessage(grpc::ByteBuffer(pieces.data(), pieces.size()), 3, &m).ok()) << cut;
    EXPECT_EQ(m.int64(1), 42);
    EXPECT_EQ(m.int32(2), -1);
    ASSERT_EQ(m.chunks.size(), 3u);
    std::vector<float> back(1000);
    for (const ChunkRef& c : m.chunks) {
      EXPECT_EQ(c.name, "layer.weight");
      EXPECT_EQ(c.offset, 100);
      EXPECT_EQ(c.length, 1000);
      int64_t n = 0;
      ASSERT_TRUE(DecodeChunk(c, back.data() + c.chunk_offset, &n).ok());
    }
    EXPECT_EQ(back, data) << "cut " << cut;
  }
  // 3. What protobuf writes, our parser reads (the tests' generated stubs).
  PullReply reply;
  reply.set_version(7);
  reply.set_optimizer_step(3);
  TensorChunk* c = reply.add_chunks();
  c->set_name("x");
  c->set_length(2);
  c->set_slot("momentum_buffer");
  c->set_data(std::string("\0\0\x80\x3f\0\0\0\x40", 8));
  const std::string pb_bytes = reply.SerializeAsString();
  grpc::Slice one(pb_bytes.data(), pb_bytes.size());
  WireMessage m;
  ASSERT_TRUE(ParseWireMessage(grpc::ByteBuffer(&one, 1), 2, &m).ok());
  EXPECT_EQ(m.int64(1), 7);
  EXPECT_EQ(m.int64(3), 3);
  ASSERT_EQ(m.chunks.size(), 1u);
  EXPECT_EQ(m.chunks[0].slot, "momentum_buffer");
  float two[2];
  int64_t n = 0;
  ASSERT_TRUE(DecodeChunk(m.chunks[0], two, &n).ok());
  EXPECT_EQ(two[0], 1.0f);
  EXPECT_EQ(two[1], 2.0f);
  // 4. Malformed bytes: InvalidArgument, never a crash.
  for (size_t keep : {size_t{1}, size_t{5}, bytes.size() / 2, bytes.size() - 1}) {
    grpc::Slice part(bytes.data(), keep);
    WireMessage bad;
    EXPECT_EQ(ParseWireMessage(grpc::ByteBuffer(&part, 1), 3, &bad).code(), Status::Code::kInvalidArgument) << keep;
  }
  const std::string group("\x0b", 1);  // field 1, wire type 3 (a group)
  grpc::Slice g(group.data(), group.size());
  WireMessage bad;
  EXPECT_THAT(ParseWireMessage(grpc::ByteBuffer(&g, 1), 3, &bad).message(), HasSubstr("wire type 3"));
}

TEST(WireCodecTest, LargeChunksCopyExactlyWhateverTheAlignment) {
  // Chunks of 1 MiB and more are copied with streaming stores (wire.cc):
  // every byte arrives, in pieces and at destinations of any alignment, and
  // nothing past the chunk is written.
  const size_t bytes = (3 << 19) + 12;  // 1.5 MiB and 3 floats
  std::vector<uint8_t> src(bytes + 16);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 131 + 7);
  for (size_t src_shift : {size_t{0}, size_t{1}, size_t{6}}) {
    for (size_t dst_shift : {size_t{0}, size_t{3}, size_t{8}, size_t{13}}) {
      ChunkRef c;
      c.size = bytes;
      const uint8_t* p = src.data() + src_shift;
      for (size_t left = bytes, i = 0; left > 0; ++i) {  // pieces of awkward sizes
        const size_t n = std::min(left, std::vector<size_t>{65537, 5, 1 << 20, 63}[i % 4]);
        c.pieces.emplace_back(p, n);
        p += n;
        left -= n;
      }
      std::vector<uint8_t> dst(bytes + 32, 0xAB);
      c.CopyTo(dst.data() + dst_shift);
      EXPECT_TRUE(std::equal(src.begin() + static_cast<std::ptrdiff_t>(src_shift),
                             src.begin() + static_cast<std::ptrdiff_t>(src_shift + bytes),
                             dst.begin() + static_cast<std::ptrdiff_t>(dst_shift)))
          << "source +" << src_shift << ", destination +" << dst_shift;
      EXPECT_TRUE(std::all_of(dst.begin(), dst.begin() + static_cast<std::ptrdiff_t>(dst_shift),
                              [](uint8_t b) { return b == 0xAB; }));
      EXPECT_TRUE(std::all_of(dst.begin() + static_cast<std::ptrdiff_t>(dst_shift + bytes), dst.end(),
                              [](uint8_t b) { return b == 0xAB; }));
    }
  }
}

TEST(ParameterShardTest, ConcurrentPushesAreAllApplied) {
  ShardOptions o;
  o.optimizer.set_kind(OptimizerConfig::SGD);
  o.optimizer.set_momentum(0);
  o.optimizer.set_nesterov(false);
  o.optimizer.set_weight_decay(0);
  o.optimizer.set_lr(0.01f);
  o.max_staleness = 1000;
  TwoShards ps(o);
  std::map<std::string, std::vector<float>> g = {{"w", std::vector<float>(600, 1.0f)}, {"b", std::vector<float>(40, 1.0f)}};
  std::vector<std::thread> workers;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; ++t) {
    workers.emplace_back([&] {
      for (int i = 0; i < 50; ++i) {
        for (int s = 0; s < 2; ++s) {
          PushResult r;
          if (!ps.shards[s]->Push(ps.shards[s]->version(), ps.Grads(s, g), &r).ok()) ++failures;
        }
      }
    });
  }
  for (auto& t : workers) t.join();
  EXPECT_EQ(failures.load(), 0);
  for (const auto& s : ps.shards) EXPECT_EQ(s->version(), 200);
  // No update lost: 200 steps of -0.01 each.
  for (const auto& [name, v] : ps.Values()) {
    for (float x : v) EXPECT_NEAR(x, 1.0f - 200 * 0.01f, 1e-4) << name;
  }
}

}  // namespace
}  // namespace dtrain::paramserver

namespace dtrain::paramserver {
namespace {

TEST(HalfTest, ConversionsMatchLibTorchBitForBit) {
  // Every fp16 and bf16 pattern to float.
  for (uint32_t h = 0; h < 65536; ++h) {
    const c10::Half ch(static_cast<uint16_t>(h), c10::Half::from_bits());
    const float want = static_cast<float>(ch);
    const float got = half::Fp16ToFloat(static_cast<uint16_t>(h));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << h;
    } else {
      EXPECT_EQ(half::Bits(got), half::Bits(want)) << h;
    }
    c10::BFloat16 cb;
    cb.x = static_cast<uint16_t>(h);
    const float wb = static_cast<float>(cb);
    if (!std::isnan(wb)) {
      EXPECT_EQ(half::Bits(half::Bf16ToFloat(static_cast<uint16_t>(h))), half::Bits(wb)) << h;
    }
  }
  // Floats to fp16 / bf16: random bit patterns, and the edges.
  std::mt19937 rng(9);
  std::vector<float> values = {0.f, -0.f, 1.f, 65504.f, 65519.f, 65520.f, 1e-8f, 5.96e-8f, 2.98e-8f, 6.1e-5f,
                               std::numeric_limits<float>::infinity(), 3.4e38f};
  for (int i = 0; i < 200000; ++i) values.push_back(half::FromBits(rng()));
  for (float f : values) {
    if (std::isnan(f)) continue;
    EXPECT_EQ(half::FloatToFp16(f), c10::Half(f).x) << f;
    EXPECT_EQ(half::FloatToBf16(f), c10::BFloat16(f).x) << f;
  }
  EXPECT_TRUE(std::isnan(half::Fp16ToFloat(half::FloatToFp16(std::nanf("")))));
  EXPECT_TRUE(std::isnan(half::Bf16ToFloat(half::FloatToBf16(std::nanf("")))));
}

// Two shard servers on loopback and a client.
class PsServiceTest : public ::testing::Test {
 protected:
  // `empty`: the servers start without slices (as dtrain-ps does) and learn
  // them from the client's Init.
  void Start(int max_message_bytes = 64 << 20, int max_staleness = 4, bool empty = false,
             AsyncConfig::StalenessPolicy policy = AsyncConfig::REJECT) {
    params_ = {{"w", 3000, 4}, {"b", 50, 4}, {"c", 700, 4}};
    ASSERT_TRUE(PlanShards(params_, 2, &plan_).ok());
    policy_ = policy;
    for (int s = 0; s < 2; ++s) {
      PsServerOptions o;
      o.shard = SgdOptions(max_staleness);
      o.shard.shard = s;
      o.shard.staleness_policy = policy;
      o.shard.lease_timeout = std::chrono::milliseconds(lease_timeout_ms_);
      if (!empty) o.shard.slices = plan_.shards[s];
      o.token = "job-token";
      o.max_message_bytes = max_message_bytes;
      o.chunk_bytes = 1000;  // many chunks per slice
      std::unique_ptr<PsServer> server;
      ASSERT_TRUE(PsServer::Start(o, &server).ok());
      addresses_.push_back("127.0.0.1:" + std::to_string(server->port()));
      servers_.push_back(std::move(server));
    }
    for (const ParamSpec& p : params_) values_[p.name].assign(static_cast<size_t>(p.numel), 0.25f);
  }
  std::unique_ptr<PsClient> Client(Compression enc = COMPRESSION_NONE, const std::string& token = "job-token",
                                   int worker = 0) {
    PsClientOptions o;
    o.addresses = addresses_;
    o.token = token;
    o.plan = plan_;
    o.encoding = enc;
    o.chunk_bytes = 1000;
    o.worker = worker;
    o.staleness_policy = policy_;
    o.timeout_s = 30;
    std::unique_ptr<PsClient> c;
    EXPECT_TRUE(PsClient::Connect(o, &c).ok());
    return c;
  }
  ConstTensors Const(const std::map<std::string, std::vector<float>>& m) {
    ConstTensors out;
    for (const auto& [k, v] : m) out[k] = v.data();
    return out;
  }
  Tensors Mutable(std::map<std::string, std::vector<float>>& m) {
    Tensors out;
    for (auto& [k, v] : m) out[k] = v.data();
    return out;
  }

  std::vector<ParamSpec> params_;
  ShardPlan plan_;
  AsyncConfig::StalenessPolicy policy_ = AsyncConfig::REJECT;
  int lease_timeout_ms_ = 120000;
  std::vector<std::unique_ptr<PsServer>> servers_;
  std::vector<std::string> addresses_;
  std::map<std::string, std::vector<float>> values_;
};

TEST_F(PsServiceTest, InitPushPullMatchTheShardsInProcess) {
  Start();
  auto client = Client();
  ASSERT_TRUE(client->Init(Const(values_), 0).ok());
  std::map<std::string, std::vector<float>> pulled = values_;
  for (auto& [k, v] : pulled) std::fill(v.begin(), v.end(), -1.f);
  ASSERT_TRUE(client->Pull(Mutable(pulled)).ok());
  EXPECT_EQ(pulled, values_);
  EXPECT_EQ(client->versions(), (std::vector<int64_t>{0, 0}));
  // Three pushes; a local twin of the two shards gets the same gradients.
  TwoShards twin(SgdOptions(4), params_);
  for (auto& [k, v] : twin.init) std::fill(v.begin(), v.end(), 0.25f);
  for (int s = 0; s < 2; ++s) {
    std::vector<SliceView> views;
    for (const ParamSlice& sl : twin.plan.shards[s]) views.push_back({sl.name, sl.offset, sl.length, twin.init[sl.name].data() + sl.offset});
    ASSERT_TRUE(twin.shards[s]->Initialize(views, 0).ok());
  }
  std::mt19937 rng(2);
  for (int step = 0; step < 3; ++step) {
    const std::map<std::string, std::vector<float>> g = RandomGradients(params_, rng);
    std::vector<PushReply> replies;
    ASSERT_TRUE(client->Push(Const(g), &replies).ok());
    EXPECT_EQ(replies[0].version(), step + 1);
    EXPECT_EQ(replies[1].staleness(), step);  // the client pulled only at version 0
    for (int s = 0; s < 2; ++s) {
      PushResult r;
      ASSERT_TRUE(twin.shards[s]->Push(0, twin.Grads(s, g), &r).ok());
    }
  }
  ASSERT_TRUE(client->Pull(Mutable(pulled)).ok());
  EXPECT_EQ(client->versions(), (std::vector<int64_t>{3, 3}));
  EXPECT_EQ(pulled, twin.Values());  // bit for bit
  // Nothing changed since: the next pull moves no data.
  const int64_t before = client->bytes_pulled();
  ASSERT_TRUE(client->Pull(Mutable(pulled)).ok());
  EXPECT_EQ(client->bytes_pulled(), before);
  // The staleness histogram is reported.
  ShardInfo info;
  ASSERT_TRUE(client->Info(0, &info).ok());
  EXPECT_EQ(info.applied(), 3);
  ASSERT_EQ(info.staleness_histogram_size(), 3);
  EXPECT_EQ(info.staleness_histogram(2).staleness(), 2);
}

TEST_F(PsServiceTest, CompressedTransportRoundsLikeHalfPrecision) {
  Start();
  auto client = Client(COMPRESSION_BF16);
  std::map<std::string, std::vector<float>> v = values_;
  v["w"][7] = 1.2345678f;
  ASSERT_TRUE(client->Init(Const(v), 0).ok());
  std::map<std::string, std::vector<float>> pulled = values_;
  ASSERT_TRUE(client->Pull(Mutable(pulled)).ok());
  EXPECT_EQ(pulled["w"][7], half::Bf16ToFloat(half::FloatToBf16(half::Bf16ToFloat(half::FloatToBf16(1.2345678f)))));
  EXPECT_NEAR(pulled["w"][7], 1.2345678f, 1.2345678f / 128);
  // Half the bytes of float32 on the wire.
  int64_t total = 0;
  for (const ParamSpec& p : params_) total += p.numel;
  EXPECT_EQ(client->bytes_pulled(), 2 * total);
}

TEST_F(PsServiceTest, WrongTokenAndMalformedPushesChangeNothing) {
  Start(/*max_message_bytes=*/64 << 10);
  auto client = Client();
  ASSERT_TRUE(client->Init(Const(values_), 0).ok());
  std::map<std::string, std::vector<float>> g = values_;
  // Wrong or missing token: UNAUTHENTICATED, nothing applied.
  auto intruder = Client(COMPRESSION_NONE, "not-the-token");
  Status st = intruder->Push(Const(g), nullptr);
  EXPECT_EQ(st.code(), Status::Code::kUnauthenticated);
  ShardInfo info;
  EXPECT_EQ(intruder->Info(0, &info).code(), Status::Code::kUnauthenticated);
  auto stub = ParameterServer::NewStub(grpc::CreateChannel(addresses_[0], grpc::InsecureChannelCredentials()));
  {
    grpc::ClientContext ctx;  // no token at all
    ShardInfo i;
    EXPECT_EQ(stub->Info(&ctx, ShardInfoRequest(), &i).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  auto push_raw = [&](const std::vector<TensorChunk>& chunks) {
    grpc::ClientContext ctx;
    rpc::AttachJobToken(&ctx, "job-token");
    PushReply reply;
    auto w = stub->Push(&ctx, &reply);
    PushRequest m;
    m.set_base_version(0);
    for (const TensorChunk& c : chunks) *m.add_chunks() = c;
    w->Write(m);
    w->WritesDone();
    return w->Finish();
  };
  const ParamSlice sl = plan_.shards[0][0];
  std::vector<float> data(static_cast<size_t>(sl.length), 1.f);
  std::vector<TensorChunk> whole;
  ChunkSlice(sl.name, sl.offset, data.data(), sl.length, COMPRESSION_NONE, 1 << 20, [&](TensorChunk&& c) { whole.push_back(c); });
  TensorChunk unknown = whole[0];
  unknown.set_name("nope");
  TensorChunk wrong_length = whole[0];
  wrong_length.set_length(sl.length + 1);
  TensorChunk half_slice = whole[0];
  half_slice.mutable_data()->resize(half_slice.data().size() / 2);
  TensorChunk ragged = whole[0];
  ragged.mutable_data()->resize(ragged.data().size() - 1);
  for (const auto& [chunks, text] : std::vector<std::pair<std::vector<TensorChunk>, std::string>>{
           {{unknown}, "no slice 'nope'"},
           {{wrong_length}, "elements, the chunk says"},
           {{half_slice}, "incomplete"},
           {{ragged}, "whole number"},
           {{whole[0], whole[0]}, "overlap"}}) {
    grpc::Status gs = push_raw(chunks);
    EXPECT_EQ(gs.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << text;
    EXPECT_THAT(gs.error_message(), HasSubstr(text));
  }
  // A message over the limit is refused by gRPC before the handler sees it.
  std::vector<float> big(100000, 1.f);
  TensorChunk huge = whole[0];
  huge.set_data(std::string(reinterpret_cast<const char*>(big.data()), big.size() * 4));
  EXPECT_EQ(push_raw({huge}).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  // None of it changed the shard.
  EXPECT_EQ(servers_[0]->shard()->version(), 0);
  std::map<std::string, std::vector<float>> pulled = values_;
  auto fresh = Client();
  ASSERT_TRUE(fresh->Pull(Mutable(pulled)).ok());
  EXPECT_EQ(pulled, values_);
}

TEST_F(PsServiceTest, StalePushIsRefusedAndTheWorkerRecoversByPulling) {
  Start(64 << 20, /*max_staleness=*/0);
  auto a = Client(), b = Client();
  ASSERT_TRUE(a->Init(Const(values_), 0).ok());
  std::map<std::string, std::vector<float>> pa = values_, pb = values_, g = values_;
  ASSERT_TRUE(a->Pull(Mutable(pa)).ok());
  ASSERT_TRUE(b->Pull(Mutable(pb)).ok());
  ASSERT_TRUE(a->Push(Const(g), nullptr).ok());       // version 1
  Status st = b->Push(Const(g), nullptr);              // computed on 0: stale under tau = 0
  EXPECT_EQ(st.code(), Status::Code::kAborted);
  EXPECT_THAT(st.message(), HasSubstr("pull and recompute"));
  ASSERT_TRUE(b->Pull(Mutable(pb)).ok());
  ASSERT_TRUE(b->Push(Const(g), nullptr).ok());       // now current
  ShardInfo info;
  ASSERT_TRUE(b->Info(1, &info).ok());
  EXPECT_EQ(info.version(), 2);
  EXPECT_EQ(info.rejected_stale(), 1);
}

TEST_F(PsServiceTest, EmptyShardsLearnSlicesScheduleAndStateFromInit) {
  Start(64 << 20, 4, /*empty=*/true);
  auto client = Client();
  // Before the chief's Init: nothing to push to or pull from.
  ShardInfo info;
  ASSERT_TRUE(client->Info(0, &info).ok());
  EXPECT_FALSE(info.initialized());
  std::map<std::string, std::vector<float>> pulled = values_, g = values_;
  Status st = client->Pull(Mutable(pulled));
  EXPECT_EQ(st.code(), Status::Code::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr("not initialised"));
  // An Init without a setup cannot fill an empty shard.
  EXPECT_EQ(client->Init(Const(values_), 0).code(), Status::Code::kFailedPrecondition);

  // Init with slices, a schedule (lr 0.2 constant, 2 pushes per step) and
  // momentum buffers, at version 10, optimizer step 5.
  PsInitOptions io;
  io.setup.mutable_schedule()->set_kind(ScheduleConfig::CONSTANT);
  io.setup.mutable_schedule()->set_warmup_fraction(0);
  io.setup.set_base_lr(0.2);
  io.setup.set_total_steps(100);
  io.setup.set_steps_per_epoch(10);
  io.setup.set_updates_per_step(2);
  std::map<std::string, std::vector<float>> momentum = values_;
  for (auto& [k, v] : momentum) std::fill(v.begin(), v.end(), 0.5f);
  io.slots["momentum_buffer"] = Const(momentum);
  io.optimizer_step = 5;
  ASSERT_TRUE(client->Init(Const(values_), 10, io).ok());
  ASSERT_TRUE(client->Info(1, &info).ok());
  EXPECT_TRUE(info.initialized());
  EXPECT_EQ(info.version(), 10);
  EXPECT_EQ(info.slices_size(), static_cast<int>(plan_.shards[1].size()));

  // The state comes back as it went in.
  std::map<std::string, std::vector<float>> mom_back = values_;
  std::map<std::string, Tensors> slots = {{"momentum_buffer", Mutable(mom_back)}};
  PsStateSnapshot snap;
  ASSERT_TRUE(client->PullState(Mutable(pulled), slots, &snap).ok());
  EXPECT_EQ(pulled, values_);
  EXPECT_EQ(mom_back, momentum);
  EXPECT_EQ(snap.optimizer_step, 5);
  EXPECT_EQ(snap.received.size(), params_.size());
  EXPECT_EQ(client->versions(), (std::vector<int64_t>{10, 10}));

  // One push of gradient 1 applies Nesterov SGD with the restored momentum
  // and the schedule's rate: buf = 0.9 * 0.5 + (1 + wd * p); p -= lr * (g + 0.9 * buf).
  for (auto& [k, v] : g) std::fill(v.begin(), v.end(), 1.f);
  ASSERT_TRUE(client->Push(Const(g), nullptr).ok());
  ASSERT_TRUE(client->Pull(Mutable(pulled)).ok());
  const float d = 1.f + 5e-4f * 0.25f;
  const float buf = 0.9f * 0.5f + d;
  EXPECT_NEAR(pulled["w"][7], 0.25f - 0.2f * (d + 0.9f * buf), 1e-6);
  EXPECT_NEAR(pulled["c"][699], 0.25f - 0.2f * (d + 0.9f * buf), 1e-6);

  // A failed Init (a chunk of another shard's slice) leaves the shard as it was.
  grpc::ClientContext ctx;
  rpc::AttachJobToken(&ctx, "job-token");
  auto channel = grpc::CreateChannel(addresses_[0], grpc::InsecureChannelCredentials());
  auto stub = ParameterServer::NewStub(channel);
  InitShardReply reply;
  auto writer = stub->Init(&ctx, &reply);
  InitShardRequest bad;
  bad.mutable_setup()->set_shard(1);  // addressed to shard 0
  writer->Write(bad);
  writer->WritesDone();
  grpc::Status gs = writer->Finish();
  EXPECT_EQ(gs.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(gs.error_message(), HasSubstr("this is shard 0"));
  ASSERT_TRUE(client->Info(0, &info).ok());
  EXPECT_EQ(info.version(), 11);
  EXPECT_EQ(info.applied(), 1);
}

// WAIT policy: two workers, one three times slower; every push within the
// bound, none refused, and the fast worker waits for leases.
void RunWaitWorkers(PsServiceTest* t, int max_staleness, int workers, std::vector<std::unique_ptr<PsClient>>* clients,
                    const std::map<std::string, std::vector<float>>& grads, int pushes_each) {
  std::vector<std::thread> threads;
  std::vector<Status> results(static_cast<size_t>(workers));
  for (int w = 0; w < workers; ++w) {
    threads.emplace_back([&, w] {
      PsClient& c = *(*clients)[static_cast<size_t>(w)];
      std::map<std::string, std::vector<float>> params = grads;
      Tensors mut;
      for (auto& [k, v] : params) mut[k] = v.data();
      ConstTensors g;
      for (const auto& [k, v] : grads) g[k] = v.data();
      for (int i = 0; i < pushes_each; ++i) {
        Status st = c.Pull(mut);  // takes the lease
        if (st.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(w == 0 ? 15 : 5));  // "compute"
        if (st.ok()) st = c.Push(g, nullptr);
        if (!st.ok()) {
          results[static_cast<size_t>(w)] = st;
          return;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (const Status& st : results) EXPECT_TRUE(st.ok()) << st.ToString();
}

TEST_F(PsServiceTest, WaitPolicyKeepsEveryPushWithinTheBound) {
  for (int tau : {0, 2}) {
    SCOPED_TRACE(tau);
    servers_.clear();
    addresses_.clear();
    Start(64 << 20, tau, false, AsyncConfig::WAIT);
    const int workers = 3, pushes = 12;
    std::vector<std::unique_ptr<PsClient>> clients;
    for (int w = 0; w < workers; ++w) clients.push_back(Client(COMPRESSION_NONE, "job-token", w));
    ASSERT_TRUE(clients[0]->Init(Const(values_), 0).ok());
    std::map<std::string, std::vector<float>> g = values_;
    for (auto& [k, v] : g) std::fill(v.begin(), v.end(), 0.01f);
    RunWaitWorkers(this, tau, workers, &clients, g, pushes);
    for (int s = 0; s < 2; ++s) {
      ShardInfo info;
      ASSERT_TRUE(clients[0]->Info(s, &info).ok());
      EXPECT_EQ(info.applied(), workers * pushes);
      EXPECT_EQ(info.rejected_stale(), 0);
      for (const auto& h : info.staleness_histogram()) EXPECT_LE(h.staleness(), tau);
      if (s == 0) EXPECT_GT(info.lease_waits(), 0);  // three workers, room for at most tau + 1
    }
  }
}

TEST_F(PsServiceTest, WaitPolicyDropsTheLeaseOfASilentWorker) {
  lease_timeout_ms_ = 300;
  Start(64 << 20, 0, false, AsyncConfig::WAIT);
  auto dead = Client(COMPRESSION_NONE, "job-token", 0);
  auto alive = Client(COMPRESSION_NONE, "job-token", 1);
  ASSERT_TRUE(dead->Init(Const(values_), 0).ok());
  std::map<std::string, std::vector<float>> p = values_;
  ASSERT_TRUE(dead->Pull(Mutable(p)).ok());  // takes the only lease, never pushes
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(alive->Pull(Mutable(p)).ok());  // waits until the lease expires
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(250));
  ASSERT_TRUE(alive->Push(Const(values_), nullptr).ok());
  // The silent worker's late push is stale now: refused, nothing changed.
  EXPECT_EQ(dead->Push(Const(values_), nullptr).code(), Status::Code::kAborted);
  ShardInfo info;
  ASSERT_TRUE(alive->Info(0, &info).ok());
  EXPECT_EQ(info.applied(), 1);
}

}  // namespace
}  // namespace dtrain::paramserver
