#include "dtrain/worker/async_strategy.h"

#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <future>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "dtrain/common/metrics_log.h"
#include "dtrain/paramserver/service.h"
#include "dtrain/paramserver/sharding.h"
#include "dtrain/worker/checkpointing.h"

namespace dtrain::worker {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// Runs tasks one at a time, in the order given, on one thread.
class SerialExecutor {
 public:
  SerialExecutor() : thread_([this] { Loop(); }) {}
  ~SerialExecutor() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  std::future<Status> Run(std::function<Status()> f) {
    std::packaged_task<Status()> task(std::move(f));
    std::future<Status> result = task.get_future();
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(task));
    }
    cv_.notify_all();
    return result;
  }

 private:
  void Loop() {
    while (true) {
      std::packaged_task<Status()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      task();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::packaged_task<Status()>> queue_;  // GUARDED_BY(mu_)
  bool stop_ = false;                               // GUARDED_BY(mu_)
  std::thread thread_;
};

// The slots a shard's optimizer of `kind` keeps per element (AdamW's step
// travels apart, as optimizer_step).
const std::vector<std::string>& StateSlots(OptimizerConfig::Kind kind) {
  static const std::vector<std::string> sgd = {"momentum_buffer"};
  static const std::vector<std::string> adamw = {"exp_avg", "exp_avg_sq"};
  return kind == OptimizerConfig::ADAMW ? adamw : sgd;
}

}  // namespace

struct AsyncStrategy::Impl {
  AsyncStrategyOptions o;
  TrainingContext ctx;
  bool attached = false;
  int rank = 0;
  int world = 1;
  std::vector<torch::Tensor> params;
  std::vector<std::string> names;
  paramserver::ShardPlan plan;
  std::unique_ptr<paramserver::PsClient> client;
  paramserver::Tensors param_ptrs;  // name -> the model's parameter memory
  std::vector<int64_t> loaded_versions;  // the shard versions of the model's parameters
  bool prefetch = false;
  bool wait_policy = false;

  // Without prefetch: shards still owed this step's gradients after a refusal.
  std::vector<bool> owed;
  int64_t refusals_in_a_row = 0;

  // With prefetch.
  std::unique_ptr<SerialExecutor> comm;
  std::vector<std::vector<float>> next_values;
  paramserver::Tensors next_ptrs;
  std::vector<int64_t> next_versions;
  std::future<Status> next_pull;
  std::vector<std::vector<float>> push_values;
  paramserver::ConstTensors push_ptrs;
  std::vector<int64_t> push_bases;
  std::vector<PushReply> push_replies;
  std::vector<Status> push_statuses;
  std::future<Status> pending_push;

  std::vector<float> zeros;  // gradient of a parameter that got none
  // The most updates any shard reported having applied (share_work: the
  // job's progress; written by the training and communication threads).
  std::atomic<int64_t> applied{0};
  void SawVersion(int64_t v) {
    int64_t cur = applied.load();
    while (v > cur && !applied.compare_exchange_weak(cur, v)) {
    }
  }
  void SawVersions(const std::vector<int64_t>& versions) {
    for (int64_t v : versions) SawVersion(v);
  }
  Totals totals;
  // Since the last AddStepMetrics.
  int64_t interval_pushes = 0, interval_recomputes = 0, interval_dropped = 0, interval_steps = 0;
  double interval_staleness = 0, interval_wait = 0;
  int64_t interval_max_staleness = 0;

  void CountAccepted(const std::vector<PushReply>& replies, const std::vector<Status>& statuses) {
    int64_t staleness = 0;
    for (size_t s = 0; s < replies.size(); ++s) {
      if (!statuses[s].ok()) continue;
      staleness = std::max<int64_t>(staleness, replies[s].staleness());
      SawVersion(replies[s].version());
    }
    ++totals.pushes;
    ++interval_pushes;
    totals.staleness_sum += static_cast<double>(staleness);
    interval_staleness += static_cast<double>(staleness);
    totals.max_staleness_seen = std::max(totals.max_staleness_seen, staleness);
    interval_max_staleness = std::max(interval_max_staleness, staleness);
  }

  // Outcome of a prefetched push: refused-as-stale pushes are dropped.
  Status SettlePush() {
    if (!pending_push.valid()) return Status::OK();
    const auto t0 = Clock::now();
    Status st = pending_push.get();
    AddWait(Seconds(t0, Clock::now()));
    if (!st.ok()) return st;
    bool dropped = false;
    for (const Status& s : push_statuses) {
      if (s.code() == Status::Code::kAborted) {
        dropped = true;
      } else if (!s.ok()) {
        return s;
      }
    }
    if (dropped) {
      ++totals.dropped_stale;
      ++interval_dropped;
    } else {
      CountAccepted(push_replies, push_statuses);
    }
    return Status::OK();
  }

  void QueuePull() {
    next_pull = comm->Run([this]() -> Status {
      paramserver::PsClient::PullOptions po;
      po.lease = false;
      Status st = client->Pull(next_ptrs, po);
      next_versions = client->versions();
      SawVersions(next_versions);
      return st;
    });
  }

  // Waits for the communication thread to finish what it was given; the
  // prefetched parameters are discarded.
  Status Drain() {
    if (!prefetch) return Status::OK();
    DTRAIN_RETURN_IF_ERROR(SettlePush());
    if (next_pull.valid()) DTRAIN_RETURN_IF_ERROR(next_pull.get());
    return Status::OK();
  }

  void AddWait(double s) {
    totals.wait_seconds += s;
    interval_wait += s;
  }

  Status PullIntoModel(const paramserver::PsClient::PullOptions& po) {
    const auto t0 = Clock::now();
    Status st = client->Pull(param_ptrs, po);
    AddWait(Seconds(t0, Clock::now()));
    loaded_versions = client->versions();
    SawVersions(loaded_versions);
    return st;
  }

  paramserver::ConstTensors Gradients() {
    paramserver::ConstTensors grads;
    for (size_t i = 0; i < params.size(); ++i) {
      const torch::Tensor& g = params[i].grad();
      if (g.defined()) {
        grads[names[i]] = g.data_ptr<float>();
      } else {
        if (zeros.size() < static_cast<size_t>(params[i].numel())) zeros.assign(static_cast<size_t>(params[i].numel()), 0.f);
        grads[names[i]] = zeros.data();
      }
    }
    return grads;
  }

  Status WriteStats() {
    nlohmann::ordered_json j;
    j["workers"] = world;
    j["shards"] = plan.num_shards;
    j["max_staleness"] = o.config.max_staleness();
    j["staleness_policy"] = AsyncConfig::StalenessPolicy_Name(o.config.staleness_policy());
    j["prefetch"] = prefetch;
    nlohmann::ordered_json shards = nlohmann::ordered_json::array();
    for (int s = 0; s < plan.num_shards; ++s) {
      ShardInfo info;
      DTRAIN_RETURN_IF_ERROR(client->Info(s, &info));
      nlohmann::ordered_json hist = nlohmann::ordered_json::object();
      std::string line;
      for (const auto& h : info.staleness_histogram()) {
        hist[std::to_string(h.staleness())] = h.pushes();
        line += (line.empty() ? "" : ", ") + std::to_string(h.staleness()) + ": " + std::to_string(h.pushes());
      }
      shards.push_back({{"shard", s},
                        {"version", info.version()},
                        {"applied", info.applied()},
                        {"rejected_stale", info.rejected_stale()},
                        {"rejected_invalid", info.rejected_invalid()},
                        {"skipped_nonfinite", info.skipped_nonfinite()},
                        {"lease_waits", info.lease_waits()},
                        {"lease_wait_s", info.lease_wait_s()},
                        {"staleness_histogram", hist}});
      spdlog::info("async: shard {} at version {}: {} update(s) applied, {} refused as stale, {} invalid, {} "
                   "non-finite skipped; staleness {{{}}}",
                   s, info.version(), info.applied(), info.rejected_stale(), info.rejected_invalid(),
                   info.skipped_nonfinite(), line);
    }
    j["shard_counters"] = shards;
    j["chief"] = {{"pushes", totals.pushes},
                  {"recomputes", totals.recomputes},
                  {"dropped_stale", totals.dropped_stale},
                  {"mean_staleness", totals.pushes ? totals.staleness_sum / static_cast<double>(totals.pushes) : 0.0},
                  {"wait_seconds", totals.wait_seconds}};
    if (o.stats_path.empty()) return Status::OK();
    return WriteFileAtomically(o.stats_path, j.dump(2) + "\n");
  }
};

AsyncStrategy::AsyncStrategy(AsyncStrategyOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->o = std::move(options);
  if (impl_->o.workers) {
    impl_->rank = impl_->o.workers->rank();
    impl_->world = impl_->o.workers->size();
  }
}

AsyncStrategy::~AsyncStrategy() {
  if (impl_ && impl_->comm) {
    // Let queued calls end before the client goes away.
    if (impl_->pending_push.valid()) impl_->pending_push.wait();
    if (impl_->next_pull.valid()) impl_->next_pull.wait();
  }
}

int AsyncStrategy::rank() const { return impl_->rank; }
int AsyncStrategy::world_size() const { return impl_->world; }

void AsyncStrategy::Attach(const TrainingContext& context) {
  impl_->ctx = context;
  impl_->attached = true;
}

Status AsyncStrategy::Setup(const std::vector<torch::Tensor>& parameters, const std::vector<torch::Tensor>& buffers) {
  Impl& m = *impl_;
  if (!m.attached || m.ctx.optimizer == nullptr) return Status::FailedPrecondition("AsyncStrategy: Attach() before Setup()");
  if (m.ctx.parameter_names.size() != parameters.size()) {
    return Status::InvalidArgument("AsyncStrategy: " + std::to_string(parameters.size()) + " parameters but " +
                                   std::to_string(m.ctx.parameter_names.size()) + " names");
  }
  if (m.o.addresses.empty()) return Status::InvalidArgument("AsyncStrategy: no parameter-server addresses");
  m.params = parameters;
  m.names = m.ctx.parameter_names;
  std::vector<paramserver::ParamSpec> specs;
  for (size_t i = 0; i < parameters.size(); ++i) {
    const torch::Tensor& p = parameters[i];
    if (p.scalar_type() != torch::kFloat32 || !p.is_contiguous() || !p.device().is_cpu()) {
      return Status::FailedPrecondition("AsyncStrategy: parameter '" + m.names[i] +
                                        "' is not a contiguous float32 CPU tensor");
    }
    specs.push_back(paramserver::ParamSpec{m.names[i], p.numel(), 4});
    m.param_ptrs[m.names[i]] = p.data_ptr<float>();
  }
  const int shards = static_cast<int>(m.o.addresses.size());
  DTRAIN_RETURN_IF_ERROR(paramserver::PlanShards(specs, shards, &m.plan));

  const AsyncConfig& ac = m.o.config;
  paramserver::PsClientOptions co;
  co.addresses = m.o.addresses;
  co.token = m.o.token;
  co.plan = m.plan;
  co.encoding = ac.transport();
  co.chunk_bytes = std::max<int64_t>(1 << 16, static_cast<int64_t>(static_cast<double>(ac.chunk_mb()) * (1 << 20)));
  co.max_message_bytes = ac.max_message_mb() << 20;
  co.timeout_s = ac.rpc_timeout_s();
  co.worker = m.rank;
  co.staleness_policy = ac.staleness_policy();
  DTRAIN_RETURN_IF_ERROR(paramserver::PsClient::Connect(co, &m.client));
  m.wait_policy = ac.staleness_policy() == AsyncConfig::WAIT;
  m.prefetch = ac.prefetch() && !m.wait_policy && ac.max_staleness() >= 1;

  // 1. The chief initialises the shards: values, schedule and (on a resume)
  //    optimizer state; versions count pushes, `world` per step.
  if (m.rank == 0) {
    paramserver::PsInitOptions io;
    io.setup.mutable_schedule()->CopyFrom(m.ctx.schedule.schedule);
    io.setup.set_base_lr(m.ctx.schedule.base_lr);
    io.setup.set_total_steps(m.ctx.schedule.total_steps);
    io.setup.set_steps_per_epoch(m.ctx.schedule.steps_per_epoch);
    io.setup.set_updates_per_step(m.world);
    io.setup.set_lr_scale(ac.scale_lr() ? 1.0 / m.world : 1.0);
    std::vector<torch::Tensor> keep;  // owns the state copies while Init streams them
    for (size_t i = 0; i < parameters.size(); ++i) {
      for (const auto& [slot, t] : OptimizerSlots(*m.ctx.optimizer, m.ctx.optimizer_kind, parameters[i])) {
        if (slot == "step") {
          io.optimizer_step = std::max<int64_t>(io.optimizer_step, t.item<int64_t>());
          continue;
        }
        const std::vector<std::string>& kept = StateSlots(m.ctx.optimizer_kind);
        if (std::find(kept.begin(), kept.end(), slot) == kept.end()) continue;
        torch::Tensor c = t.detach().to(torch::kFloat32).contiguous();
        keep.push_back(c);
        io.slots[slot][m.names[i]] = c.data_ptr<float>();
      }
    }
    paramserver::ConstTensors values(m.param_ptrs.begin(), m.param_ptrs.end());
    DTRAIN_RETURN_IF_ERROR(m.client->Init(values, m.ctx.start_step * m.world, io).WithContext("initialising the shards"));
    spdlog::info("async: {} shard(s) initialised at version {} ({} worker(s), max_staleness {}, {}{}{})", shards,
                 m.ctx.start_step * m.world, m.world, ac.max_staleness(),
                 AsyncConfig::StalenessPolicy_Name(ac.staleness_policy()), m.prefetch ? ", prefetch" : "",
                 io.slots.empty() ? "" : ", optimizer state restored");
  }
  if (m.o.workers && m.world > 1) {
    collective::OpOptions bo;
    bo.label = "async start (the chief initialises the shards)";
    DTRAIN_RETURN_IF_ERROR(m.o.workers->Barrier(bo)->Wait());
  }
  // Every worker starts from the shards' parameters.
  paramserver::PsClient::PullOptions po;
  po.lease = false;
  po.everything = true;
  DTRAIN_RETURN_IF_ERROR(m.PullIntoModel(po).WithContext("first pull"));
  m.owed.assign(static_cast<size_t>(shards), true);
  if (m.prefetch) {
    m.comm = std::make_unique<SerialExecutor>();
    for (size_t i = 0; i < parameters.size(); ++i) {
      const float* p = parameters[i].data_ptr<float>();
      m.next_values.emplace_back(p, p + parameters[i].numel());
      m.push_values.emplace_back(static_cast<size_t>(parameters[i].numel()), 0.f);
    }
    for (size_t i = 0; i < parameters.size(); ++i) {
      m.next_ptrs[m.names[i]] = m.next_values[i].data();
      m.push_ptrs[m.names[i]] = m.push_values[i].data();
    }
    m.next_versions = m.loaded_versions;
  }
  return Status::OK();
}

Status AsyncStrategy::BeginStep() {
  Impl& m = *impl_;
  ++m.interval_steps;
  if (!m.prefetch) {
    // Pull, compute, push: the parameters of this step (under WAIT, after
    // taking the lease that bounds its staleness).
    return m.PullIntoModel(paramserver::PsClient::PullOptions()).WithContext("pull");
  }
  if (!m.next_pull.valid()) m.QueuePull();
  const auto t0 = Clock::now();
  Status st = m.next_pull.get();
  m.AddWait(Seconds(t0, Clock::now()));
  DTRAIN_RETURN_IF_ERROR(st.WithContext("prefetched pull"));
  for (size_t i = 0; i < m.params.size(); ++i) {
    std::memcpy(m.params[i].data_ptr<float>(), m.next_values[i].data(), m.next_values[i].size() * sizeof(float));
  }
  m.loaded_versions = m.next_versions;
  m.QueuePull();  // the next step's parameters, while this one computes
  return Status::OK();
}

Status AsyncStrategy::ApplyUpdate(torch::optim::Optimizer&, bool* recompute) {
  Impl& m = *impl_;
  *recompute = false;
  if (m.prefetch) {
    DTRAIN_RETURN_IF_ERROR(m.SettlePush().WithContext("push"));
    const paramserver::ConstTensors grads = m.Gradients();
    for (size_t i = 0; i < m.params.size(); ++i) {
      std::memcpy(m.push_values[i].data(), grads.at(m.names[i]), m.push_values[i].size() * sizeof(float));
    }
    m.push_bases = m.loaded_versions;
    m.pending_push = m.comm->Run([&m]() -> Status {
      Status first = m.client->Push(m.push_ptrs, &m.push_replies, &m.push_statuses, nullptr, &m.push_bases);
      (void)first;  // each shard's outcome is in push_statuses
      return Status::OK();
    });
    return Status::OK();
  }
  std::vector<PushReply> replies;
  std::vector<Status> statuses;
  const auto t0 = Clock::now();
  Status first = m.client->Push(m.Gradients(), &replies, &statuses, &m.owed, &m.loaded_versions);
  (void)first;  // each shard's outcome is in statuses
  m.AddWait(Seconds(t0, Clock::now()));
  bool refused = false;
  bool lease_refused = false;
  for (size_t s = 0; s < statuses.size(); ++s) {
    if (!m.owed[s]) continue;
    if (statuses[s].ok()) {
      m.owed[s] = false;
    } else if (statuses[s].code() == Status::Code::kAborted) {
      refused = true;
      if (s == 0) lease_refused = true;
    } else {
      return statuses[s].WithContext("push");
    }
  }
  if (!refused) {
    m.CountAccepted(replies, std::vector<Status>(statuses.size(), Status::OK()));
    m.owed.assign(m.owed.size(), true);
    m.refusals_in_a_row = 0;
    return Status::OK();
  }
  // 2. Refused as stale: compute this step again on fresh parameters, for the
  //    shards that refused.
  if (++m.refusals_in_a_row > 100) {
    return Status::Aborted("the shards refused 100 pushes in a row as more than max_staleness (" +
                           std::to_string(m.o.config.max_staleness()) +
                           ") updates stale; raise parallelism.async.max_staleness or use staleness_policy WAIT");
  }
  ++m.totals.recomputes;
  ++m.interval_recomputes;
  paramserver::PsClient::PullOptions po;
  po.lease = lease_refused;  // a lease on shard 0 is only needed when it still waits for this step
  DTRAIN_RETURN_IF_ERROR(m.PullIntoModel(po).WithContext("re-pull after a stale push"));
  *recompute = true;
  return Status::OK();
}

Status AsyncStrategy::PrepareCheckpoint() {
  if (!is_chief()) return Status::OK();  // the chief writes checkpoints
  Impl& m = *impl_;
  DTRAIN_RETURN_IF_ERROR(m.Drain());
  // Values into the model, optimizer state into buffers, then into the local
  // optimizer, which the checkpoint writer reads.
  std::map<std::string, std::vector<std::vector<float>>> buffers;
  std::map<std::string, paramserver::Tensors> slots;
  for (const std::string& slot : StateSlots(m.ctx.optimizer_kind)) {
    auto& b = buffers[slot];
    for (size_t i = 0; i < m.params.size(); ++i) {
      b.emplace_back(static_cast<size_t>(m.params[i].numel()), 0.f);
      slots[slot][m.names[i]] = b.back().data();
    }
  }
  paramserver::PsStateSnapshot snap;
  const auto t0 = Clock::now();
  DTRAIN_RETURN_IF_ERROR(m.client->PullState(m.param_ptrs, slots, &snap).WithContext("pulling the shards' state"));
  m.AddWait(Seconds(t0, Clock::now()));
  m.loaded_versions = m.client->versions();
  m.SawVersions(m.loaded_versions);
  for (size_t i = 0; i < m.params.size(); ++i) {
    std::map<std::string, torch::Tensor> state;
    for (const std::string& slot : StateSlots(m.ctx.optimizer_kind)) {
      if (!snap.received.count({slot, m.names[i]})) continue;
      state[slot] = torch::from_blob(buffers[slot][i].data(), m.params[i].sizes(), torch::kFloat32).clone();
    }
    if (!state.empty() && m.ctx.optimizer_kind == OptimizerConfig::ADAMW) {
      state["step"] = torch::tensor(snap.optimizer_step, torch::kInt64);
    }
    SetOptimizerSlots(*m.ctx.optimizer, m.ctx.optimizer_kind, m.params[i], state);
  }
  if (m.prefetch) {
    // The prefetch buffers follow the client's versions.
    for (size_t i = 0; i < m.params.size(); ++i) {
      std::memcpy(m.next_values[i].data(), m.params[i].data_ptr<float>(), m.next_values[i].size() * sizeof(float));
    }
    m.next_versions = m.loaded_versions;
  }
  return Status::OK();
}

void AsyncStrategy::AddStepMetrics(MetricsLog::Record* record) {
  Impl& m = *impl_;
  const double steps = static_cast<double>(std::max<int64_t>(m.interval_steps, 1));
  record->push_back({"staleness_mean", m.interval_pushes ? m.interval_staleness / static_cast<double>(m.interval_pushes) : 0.0});
  record->push_back({"staleness_max", static_cast<double>(m.interval_max_staleness)});
  record->push_back({"ps_wait_ms", 1e3 * m.interval_wait / steps});
  record->push_back({"recomputes", static_cast<double>(m.interval_recomputes)});
  record->push_back({"dropped_stale", static_cast<double>(m.interval_dropped)});
  m.interval_pushes = m.interval_recomputes = m.interval_dropped = m.interval_steps = m.interval_max_staleness = 0;
  m.interval_staleness = m.interval_wait = 0;
}

bool AsyncStrategy::SharesSteps() const { return impl_->o.config.share_work(); }

int64_t AsyncStrategy::JobStep() const { return impl_->applied.load() / std::max(1, impl_->world); }

Status AsyncStrategy::Finish() {
  Impl& m = *impl_;
  if (!m.client) return Status::OK();
  DTRAIN_RETURN_IF_ERROR(m.Drain().WithContext("end of training"));
  if (m.o.workers && m.world > 1) {
    collective::OpOptions bo;
    bo.label = "end of training (waiting for the slower workers)";
    bo.timeout = std::chrono::hours(24);
    DTRAIN_RETURN_IF_ERROR(m.o.workers->Barrier(bo)->Wait());
  }
  const Totals& t = m.totals;
  spdlog::info("async worker {}: {} push(es) accepted, {} recomputed, {} dropped as stale, mean staleness {:.2f}, "
               "{:.1f} s waiting for the shards, {:.1f} MB pushed, {:.1f} MB pulled",
               m.rank, t.pushes, t.recomputes, t.dropped_stale,
               t.pushes ? t.staleness_sum / static_cast<double>(t.pushes) : 0.0, t.wait_seconds,
               static_cast<double>(m.client->bytes_pushed()) / 1e6, static_cast<double>(m.client->bytes_pulled()) / 1e6);
  if (m.rank != 0) return Status::OK();
  // The final parameters: every worker's last update is in.
  paramserver::PsClient::PullOptions po;
  po.lease = false;
  po.everything = true;
  DTRAIN_RETURN_IF_ERROR(m.PullIntoModel(po).WithContext("final pull"));
  return m.WriteStats();
}

AsyncStrategy::Totals AsyncStrategy::totals() const {
  Totals t = impl_->totals;
  if (impl_->client) {
    t.bytes_pushed = impl_->client->bytes_pushed();
    t.bytes_pulled = impl_->client->bytes_pulled();
  }
  return t;
}

}  // namespace dtrain::worker
