#include "dtrain/worker/pipeline_strategy.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "dtrain/worker/checkpointing.h"
#include "dtrain/worker/pipeline.h"

namespace dtrain::worker {
namespace {

using Clock = std::chrono::steady_clock;

// Tags of the gather to rank 0, above every tag of a mini-batch (4i+k).
constexpr int kGatherTagBase = 1 << 24;

// The optimizer slots the gather carries, in order.
const std::vector<std::string>& SlotNames(OptimizerConfig::Kind kind) {
  static const std::vector<std::string> sgd = {"momentum_buffer"};
  static const std::vector<std::string> adamw = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"};
  return kind == OptimizerConfig::ADAMW ? adamw : sgd;
}

// "model/layers.<i>.<...>" -> i; -1 for anything else.
int LayerOf(const std::string& name) {
  const std::string prefix = "layers.";
  const size_t at = name.find(prefix);
  if (at == std::string::npos) return -1;
  const size_t start = at + prefix.size();
  const size_t dot = name.find('.', start);
  return std::stoi(name.substr(start, dot - start));
}

}  // namespace

Status CheckPipelineConfig(const JobConfig& config) {
  const PipelineConfig& pc = config.parallelism().pipeline();
  if (config.optimizer().grad_clip_norm() > 0) {
    return Status::FailedPrecondition(
        "optimizer.grad_clip_norm is not supported with parallelism.pipeline (the norm spans every stage); "
        "set it to 0");
  }
  if (config.loss().name() == "triplet" && config.loss().triplet().mining_scope() == TripletConfig::GLOBAL) {
    return Status::FailedPrecondition(
        "loss.triplet.mining_scope GLOBAL mines over the workers' global batch, which a pipeline does not have; "
        "use LOCAL (each micro-batch mines its own triplets)");
  }
  const int64_t smallest = config.data().batch_size() / std::max(1, pc.micro_batches());
  if (smallest < 2) {
    return Status::FailedPrecondition(
        "parallelism.pipeline.micro_batches " + std::to_string(pc.micro_batches()) + " with data.batch_size " +
        std::to_string(config.data().batch_size()) +
        " makes micro-batches of fewer than 2 samples; the embedding head's BatchNorm needs 2 per micro-batch");
  }
  if (config.loss().name() == "triplet" && pc.schedule() == PipelineConfig::ONE_F_ONE_B &&
      config.data().sampler() == DataConfig::PK && config.data().pk_classes() % pc.micro_batches() != 0) {
    return Status::FailedPrecondition("data.pk_classes " + std::to_string(config.data().pk_classes()) +
                                      " is not a multiple of parallelism.pipeline.micro_batches " +
                                      std::to_string(pc.micro_batches()) +
                                      ": each micro-batch must hold whole classes to mine its own triplets");
  }
  return Status::OK();
}

struct PipelineStrategy::Impl {
  PipelineStrategyOptions o;
  TrainingContext ctx;
  int stages = 1, stage = 0, replica = 0, replicas = 1;
  pipeline::Partition partition;
  std::unique_ptr<pipeline::StageExecutor> executor;
  // Every parameter of the model and loss, and its name ("model/...").
  std::vector<torch::Tensor> params;
  // Per stage: indices into params, and the model's buffers it holds.
  std::vector<std::vector<size_t>> stage_params;
  std::vector<std::vector<torch::Tensor>> stage_buffers;
  pipeline::StageStats last;
  double wait_ms = 0, reduce_ms = 0;
  // The stage-group reductions of this step, started after the last
  // backward (ForwardBackward), waited for in FinishGradients.
  std::vector<std::shared_ptr<collective::Work>> reductions;
  Status StartStageReduction();

  int StageOf(const std::string& name) const {
    if (name.rfind("loss/", 0) == 0) return stages - 1;
    const int layer = LayerOf(name);
    for (int s = 0; s < stages; ++s) {
      if (layer >= partition.begin(s) && layer < partition.end(s)) return s;
    }
    return 0;
  }

  // Stages 1..S-1 of replica 0 send their tensors to rank 0 (the chief).
  Status Gather() {
    if (replica != 0 || stages == 1) return Status::OK();
    collective::Collective& w = *o.world;
    const std::vector<std::string>& slots = SlotNames(ctx.optimizer_kind);
    std::vector<std::shared_ptr<collective::Work>> sends;
    std::vector<torch::Tensor> keep;
    for (int s = 1; s < stages; ++s) {
      const bool sending = stage == s, receiving = stage == 0;
      if (!sending && !receiving) continue;
      int tag = kGatherTagBase;  // per sender: rank 0 receives from each in turn
      collective::OpOptions opt;
      opt.label = "gathering stage " + std::to_string(s) + " for the checkpoint";
      auto move = [&](torch::Tensor t) -> Status {
        if (sending) {
          keep.push_back(t.detach().contiguous());  // untouched until WaitAll below
          sends.push_back(w.Send(keep.back(), 0, tag++, opt));
          return Status::OK();
        }
        return w.Recv(t, s, tag++, opt)->Wait();
      };
      torch::NoGradGuard no_grad;
      for (size_t i : stage_params[static_cast<size_t>(s)]) {
        torch::Tensor& p = params[i];
        if (sending) {
          DTRAIN_RETURN_IF_ERROR(move(p));
        } else {
          torch::Tensor in = torch::empty_like(p);
          DTRAIN_RETURN_IF_ERROR(move(in));
          p.copy_(in);
        }
        // The optimizer slots: a presence mask, then each present slot.
        std::map<std::string, torch::Tensor> have =
            sending ? OptimizerSlots(*ctx.optimizer, ctx.optimizer_kind, p) : std::map<std::string, torch::Tensor>();
        torch::Tensor mask = torch::zeros({static_cast<int64_t>(slots.size())}, torch::kInt64);
        if (sending) {
          for (size_t k = 0; k < slots.size(); ++k) mask[static_cast<int64_t>(k)] = have.count(slots[k]) ? 1 : 0;
        }
        DTRAIN_RETURN_IF_ERROR(move(mask));
        if (receiving) {
          std::map<std::string, torch::Tensor> got;
          for (size_t k = 0; k < slots.size(); ++k) {
            if (mask[static_cast<int64_t>(k)].item<int64_t>() == 0) continue;
            torch::Tensor t = slots[k] == "step" ? torch::zeros({}, torch::kInt64) : torch::empty_like(p);
            DTRAIN_RETURN_IF_ERROR(move(t));
            got[slots[k]] = t;
          }
          SetOptimizerSlots(*ctx.optimizer, ctx.optimizer_kind, p, got);
        } else {
          for (size_t k = 0; k < slots.size(); ++k) {
            if (have.count(slots[k])) DTRAIN_RETURN_IF_ERROR(move(have[slots[k]]));
          }
        }
      }
      for (torch::Tensor& b : stage_buffers[static_cast<size_t>(s)]) {
        if (sending) {
          DTRAIN_RETURN_IF_ERROR(move(b));
        } else {
          torch::Tensor in = torch::empty_like(b);
          DTRAIN_RETURN_IF_ERROR(move(in));
          b.copy_(in);
        }
      }
    }
    return collective::WaitAll(sends);
  }
};

PipelineStrategy::PipelineStrategy(PipelineStrategyOptions options) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.o = std::move(options);
  m.stages = m.o.config.stages();
  m.stage = m.o.world->rank() % m.stages;
  m.replica = m.o.world->rank() / m.stages;
  m.replicas = m.o.world->size() / m.stages;
}

PipelineStrategy::~PipelineStrategy() = default;

int PipelineStrategy::rank() const { return impl_->o.world->rank(); }
int PipelineStrategy::world_size() const { return impl_->o.world->size(); }
int PipelineStrategy::data_rank() const { return impl_->replica; }
int PipelineStrategy::data_world_size() const { return impl_->replicas; }

void PipelineStrategy::Attach(const TrainingContext& context) { impl_->ctx = context; }

Status PipelineStrategy::Setup(const std::vector<torch::Tensor>& parameters, const std::vector<torch::Tensor>&) {
  Impl& m = *impl_;
  if (m.ctx.model == nullptr || m.ctx.loss == nullptr) return Status::Internal("the pipeline needs the model");
  m.params = parameters;
  torch::nn::Sequential& layers = m.ctx.model->layers();
  const int n = static_cast<int>(layers->size());
  if (n < m.stages) {
    return Status::FailedPrecondition("parallelism.pipeline.stages " + std::to_string(m.stages) + " exceeds the " +
                                      std::to_string(n) + " layers of the model");
  }
  // Rank 0 cuts the model; everyone takes its cut.
  torch::Tensor cut = torch::zeros({m.stages}, torch::kInt64);
  if (m.o.world->rank() == 0) {
    const int64_t micro = std::max<int64_t>(2, m.o.batch / m.o.config.micro_batches());
    const auto& eo = m.ctx.model->options();
    const torch::Tensor sample = m.o.config.layers_per_stage_size() > 0
                                     ? torch::Tensor()
                                     : torch::randn({micro, eo.in_channels, 28, 28});
    DTRAIN_RETURN_IF_ERROR(pipeline::PartitionModel(m.o.config, layers, sample, &m.partition));
    for (int s = 0; s < m.stages; ++s) cut[s] = m.partition.layers_per_stage[static_cast<size_t>(s)];
  }
  collective::OpOptions opt;
  opt.label = "pipeline partition";
  DTRAIN_RETURN_IF_ERROR(m.o.world->Broadcast(cut, 0, opt)->Wait());
  if (m.o.world->rank() != 0) {
    m.partition.layers_per_stage.clear();
    for (int s = 0; s < m.stages; ++s) m.partition.layers_per_stage.push_back(static_cast<int>(cut[s].item<int64_t>()));
    m.partition.source = "from rank 0";
  } else {
    spdlog::info("{}", pipeline::DescribePartition(m.partition));
  }
  m.stage_params.assign(static_cast<size_t>(m.stages), {});
  for (size_t i = 0; i < m.params.size(); ++i) {
    m.stage_params[static_cast<size_t>(m.StageOf(m.ctx.parameter_names[i]))].push_back(i);
  }
  m.stage_buffers.assign(static_cast<size_t>(m.stages), {});
  for (const auto& b : m.ctx.model->named_buffers()) {
    m.stage_buffers[static_cast<size_t>(m.StageOf("model/" + b.key()))].push_back(b.value());
  }
  pipeline::StageOptions so;
  so.stage = m.stage;
  so.stages = m.stages;
  so.prev_rank = m.stage > 0 ? m.o.world->rank() - 1 : -1;
  so.next_rank = m.stage + 1 < m.stages ? m.o.world->rank() + 1 : -1;
  so.micro_batches = m.o.config.micro_batches();
  so.schedule = m.o.config.schedule();
  // Triplet mining over the whole mini-batch where the schedule allows it
  // (GPipe); per micro-batch under 1F1B.
  so.whole_batch_loss = m.ctx.loss->name() == "triplet" && so.schedule == PipelineConfig::GPIPE;
  m.executor = std::make_unique<pipeline::StageExecutor>(
      m.ctx.model->SliceLayers(m.partition.begin(m.stage), m.partition.end(m.stage)), m.o.world.get(), so);
  if (m.o.world->rank() == 0) {
    spdlog::info("pipeline: {} stage(s) x {} replica(s), {} micro-batches per mini-batch of {}, schedule {}{}",
                 m.stages, m.replicas, so.micro_batches, m.o.batch, PipelineConfig::Schedule_Name(so.schedule),
                 so.whole_batch_loss ? ", loss over the whole mini-batch" : "");
  }
  return Status::OK();
}

Status PipelineStrategy::ForwardBackward(const torch::Tensor& images, const torch::Tensor& labels,
                                         models::LossOutput* out) {
  Impl& m = *impl_;
  models::LossModuleImpl* loss = m.ctx.loss;
  double active = 0;
  int micro = 0;
  auto micro_loss = [&](const torch::Tensor& emb, const torch::Tensor& y) {
    models::LossOutput lo = loss->Compute(emb, y);
    active += lo.active_fraction;
    ++micro;
    return lo.loss;
  };
  DTRAIN_RETURN_IF_ERROR(m.executor->RunMiniBatch(images, labels, images.size(0), micro_loss, &m.last));
  // This stage's last backward is done: its data-parallel reduction starts
  // now, beside the loss reduction (FinishGradients waits for it).
  DTRAIN_RETURN_IF_ERROR(m.StartStageReduction());
  // The replicas' mean loss, on every rank (only last stages contribute).
  const auto t0 = Clock::now();
  torch::Tensor figures = torch::zeros({2}, torch::kFloat64);
  if (m.stage == m.stages - 1) {
    figures[0] = m.last.loss;
    figures[1] = micro > 0 ? active / micro : 0.0;
  }
  collective::OpOptions opt;
  opt.label = "pipeline loss";
  DTRAIN_RETURN_IF_ERROR(m.o.world->AllReduce(figures, collective::ReduceOp::kSum, opt)->Wait());
  m.wait_ms = 1e3 * (m.last.wait_s + std::chrono::duration<double>(Clock::now() - t0).count());
  out->loss = torch::tensor(figures[0].item<double>() / m.replicas);
  out->active_fraction = figures[1].item<double>() / m.replicas;
  return Status::OK();
}

Status PipelineStrategy::FinishGradients() {
  Impl& m = *impl_;
  const auto t0 = Clock::now();
  const Status st = collective::WaitAll(m.reductions);
  m.reductions.clear();
  m.reduce_ms = m.o.stage_group ? 1e3 * std::chrono::duration<double>(Clock::now() - t0).count() : 0.0;
  return st;
}

Status PipelineStrategy::Impl::StartStageReduction() {
  reductions.clear();
  if (!o.stage_group) return Status::OK();
  std::vector<std::shared_ptr<collective::Work>>& works = reductions;
  Impl& m = *this;
  for (size_t i : m.stage_params[static_cast<size_t>(m.stage)]) {
    torch::Tensor& p = m.params[i];
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    collective::OpOptions opt;
    opt.label = "stage " + std::to_string(m.stage) + " gradient " + std::to_string(i);
    works.push_back(m.o.stage_group->AllReduce(p.mutable_grad(), collective::ReduceOp::kAverage, opt));
  }
  // The replicas' BatchNorm running statistics, averaged as the sync
  // strategy does (the step counter is the same everywhere).
  for (torch::Tensor& b : m.stage_buffers[static_cast<size_t>(m.stage)]) {
    if (!b.is_floating_point()) continue;
    collective::OpOptions opt;
    opt.label = "stage " + std::to_string(m.stage) + " BatchNorm statistics";
    works.push_back(m.o.stage_group->AllReduce(b, collective::ReduceOp::kAverage, opt));
  }
  return Status::OK();
}

Status PipelineStrategy::PrepareCheckpoint() { return impl_->Gather(); }

Status PipelineStrategy::Finish() { return impl_->Gather(); }

void PipelineStrategy::AddStepMetrics(MetricsLog::Record* record) {
  const Impl& m = *impl_;
  record->push_back({"pipeline_wait_ms", m.wait_ms});
  record->push_back({"stage_reduce_ms", m.reduce_ms});
  record->push_back({"peak_micro_batches", static_cast<double>(m.last.peak_in_flight)});
  record->push_back({"peak_activation_mb", static_cast<double>(m.last.peak_activation_bytes) / 1e6});
}

}  // namespace dtrain::worker
