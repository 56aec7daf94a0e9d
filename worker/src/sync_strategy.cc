#include "dtrain/worker/sync_strategy.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <mutex>
#include <string>

namespace dtrain::worker {
namespace {

using Clock = std::chrono::steady_clock;
using collective::OpOptions;
using collective::ReduceOp;
using collective::Work;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

collective::WireType Wire(Compression c) {
  switch (c) {
    case COMPRESSION_FP16: return collective::WireType::kFp16;
    case COMPRESSION_BF16: return collective::WireType::kBf16;
    default: return collective::WireType::kNative;
  }
}

// One bucket: a flat buffer holding the gradients of its parameters.
struct Bucket {
  std::vector<size_t> params;   // indices into Impl::params, reverse registration order
  std::vector<int64_t> offset;  // element offset of each parameter in `flat`
  torch::Tensor flat;
  std::vector<bool> ready;      // per entry of params, this step
  size_t pending = 0;           // params not yet ready this step
  std::shared_ptr<Work> work;   // set once launched this step
};

}  // namespace

std::vector<std::vector<size_t>> AssignBuckets(const std::vector<int64_t>& bytes, const std::vector<int>& dtype,
                                               int64_t cap_bytes) {
  std::vector<std::vector<size_t>> buckets;
  std::vector<size_t> current;
  int64_t current_bytes = 0;
  int current_dtype = 0;
  for (size_t k = bytes.size(); k-- > 0;) {
    if (!current.empty() && dtype[k] != current_dtype) {
      buckets.push_back(std::move(current));
      current.clear();
      current_bytes = 0;
    }
    current.push_back(k);
    current_dtype = dtype[k];
    current_bytes += bytes[k];
    if (current_bytes >= cap_bytes) {
      buckets.push_back(std::move(current));
      current.clear();
      current_bytes = 0;
    }
  }
  if (!current.empty()) buckets.push_back(std::move(current));
  return buckets;
}

SyncStrategyOptions SyncOptionsFromConfig(const JobConfig& config) {
  const SyncConfig& s = config.parallelism().sync();
  SyncStrategyOptions o;
  o.bucket_bytes = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(s.bucket_size_mb()) * (1 << 20)));
  o.overlap = s.overlap();
  o.compression = Wire(s.compression());
  o.global_mining = config.loss().name() == "triplet" && config.loss().triplet().mining_scope() == TripletConfig::GLOBAL;
  return o;
}

struct SyncStrategy::Impl {
  std::unique_ptr<collective::Collective> coll;
  SyncStrategyOptions options;
  std::vector<torch::Tensor> params;
  std::vector<torch::Tensor> float_buffers;  // BatchNorm running statistics
  std::vector<std::vector<size_t>> assignment;
  std::vector<Bucket> buckets;
  std::vector<size_t> bucket_of;    // parameter -> bucket
  std::vector<size_t> slot_of;      // parameter -> position in its bucket
  size_t next_launch = 0;           // first bucket not launched this step
  std::mutex mu;                    // hooks may run on an autograd thread

  // Interval figures for metrics.jsonl (reset by AddStepMetrics).
  int64_t interval_steps = 0;
  double interval_comm = 0, interval_wait = 0;
  Totals totals;

  ReduceOp grad_op() const { return options.global_mining ? ReduceOp::kSum : ReduceOp::kAverage; }
  std::string BucketLabel(size_t b) const {
    return "grad bucket " + std::to_string(b + 1) + "/" + std::to_string(buckets.size());
  }
  void Launch(size_t b, bool in_backward) {
    Bucket& bucket = buckets[b];
    ++totals.buckets_launched;
    if (in_backward) ++totals.buckets_launched_in_backward;
    OpOptions o;
    o.label = BucketLabel(b);
    o.wire = options.compression;
    bucket.work = coll->AllReduce(bucket.flat, grad_op(), o);
  }
  // Launches every complete bucket that is next in order. Caller holds mu.
  void LaunchReady(bool in_backward) {
    while (next_launch < buckets.size() && buckets[next_launch].pending == 0) Launch(next_launch++, in_backward);
  }
  void OnGradient(size_t p, const torch::Tensor& grad) {
    std::lock_guard<std::mutex> lock(mu);
    Bucket& bucket = buckets[bucket_of[p]];
    const size_t slot = slot_of[p];
    // One backward gives each parameter one gradient; a bucket already
    // launched is not written again.
    if (bucket.work) return;
    torch::NoGradGuard no_grad;
    bucket.flat.narrow(0, bucket.offset[slot], grad.numel()).view_as(grad).copy_(grad);
    if (!bucket.ready[slot]) {
      bucket.ready[slot] = true;
      --bucket.pending;
    }
    LaunchReady(/*in_backward=*/true);
  }
};

SyncStrategy::SyncStrategy(std::unique_ptr<collective::Collective> collective, SyncStrategyOptions options)
    : impl_(std::make_unique<Impl>()) {
  impl_->coll = std::move(collective);
  impl_->options = options;
}

SyncStrategy::~SyncStrategy() = default;

int SyncStrategy::rank() const { return impl_->coll->rank(); }
int SyncStrategy::world_size() const { return impl_->coll->size(); }
const std::vector<std::vector<size_t>>& SyncStrategy::buckets() const { return impl_->assignment; }
collective::Collective& SyncStrategy::collective() { return *impl_->coll; }

SyncStrategy::Totals SyncStrategy::totals() const { return impl_->totals; }

Status SyncStrategy::Setup(const std::vector<torch::Tensor>& parameters, const std::vector<torch::Tensor>& buffers) {
  Impl& m = *impl_;
  m.params = parameters;
  // 1. Replicas start equal: rank 0's parameters and buffers everywhere.
  {
    torch::NoGradGuard no_grad;
    std::vector<std::shared_ptr<Work>> works;
    for (size_t i = 0; i < parameters.size(); ++i) {
      OpOptions o;
      o.label = "initial parameter " + std::to_string(i);
      works.push_back(m.coll->Broadcast(parameters[i].detach(), 0, o));
    }
    for (size_t i = 0; i < buffers.size(); ++i) {
      OpOptions o;
      o.label = "initial buffer " + std::to_string(i);
      works.push_back(m.coll->Broadcast(buffers[i], 0, o));
      if (buffers[i].is_floating_point()) m.float_buffers.push_back(buffers[i]);
    }
    DTRAIN_RETURN_IF_ERROR(collective::WaitAll(works).WithContext("broadcasting the model from rank 0"));
  }
  // 2. Buckets.
  std::vector<int64_t> bytes;
  std::vector<int> dtypes;
  for (const torch::Tensor& p : parameters) {
    bytes.push_back(p.numel() * static_cast<int64_t>(p.element_size()));
    dtypes.push_back(static_cast<int>(p.scalar_type()));
  }
  m.assignment = AssignBuckets(bytes, dtypes, m.options.bucket_bytes);
  m.bucket_of.assign(parameters.size(), 0);
  m.slot_of.assign(parameters.size(), 0);
  m.buckets.clear();
  for (size_t b = 0; b < m.assignment.size(); ++b) {
    Bucket bucket;
    bucket.params = m.assignment[b];
    int64_t numel = 0;
    for (size_t s = 0; s < bucket.params.size(); ++s) {
      const size_t p = bucket.params[s];
      m.bucket_of[p] = b;
      m.slot_of[p] = s;
      bucket.offset.push_back(numel);
      numel += parameters[p].numel();
    }
    bucket.flat = torch::zeros({numel}, parameters[bucket.params[0]].options().requires_grad(false));
    bucket.ready.assign(bucket.params.size(), false);
    bucket.pending = bucket.params.size();
    m.buckets.push_back(std::move(bucket));
  }
  int64_t total = 0;
  for (int64_t b : bytes) total += b;
  spdlog::info("sync: {} rank(s) over {}, {} parameter tensor(s) ({:.2f} MB) in {} bucket(s) of <= {:.2f} MB, "
               "overlap {}, wire {}, mining {}",
               m.coll->size(), m.coll->backend(), parameters.size(), static_cast<double>(total) / (1 << 20),
               m.buckets.size(), static_cast<double>(m.options.bucket_bytes) / (1 << 20),
               m.options.overlap ? "on" : "off", collective::WireTypeName(m.options.compression),
               m.options.global_mining ? "global" : "local");
  // 3. Hooks: they fire with the gradient of the whole backward for the
  // parameter (before it is accumulated into .grad).
  if (m.options.overlap && m.coll->size() > 1) {
    for (size_t p = 0; p < parameters.size(); ++p) {
      torch::Tensor param = parameters[p];
      if (!param.requires_grad()) continue;
      Impl* raw = impl_.get();
      param.register_hook([raw, p](torch::Tensor grad) { raw->OnGradient(p, grad); });
    }
  }
  return Status::OK();
}

Status SyncStrategy::ComputeLoss(models::LossModuleImpl& loss, const torch::Tensor& embeddings,
                                 const torch::Tensor& labels, models::LossOutput* out) {
  Impl& m = *impl_;
  const int world = m.coll->size();
  if (!m.options.global_mining || world == 1) return Strategy::ComputeLoss(loss, embeddings, labels, out);
  const int64_t b = embeddings.size(0);
  // Every rank must gather the same shapes: check the local batch sizes first.
  torch::Tensor sizes = torch::empty({world}, torch::kInt64);
  torch::Tensor mine = torch::full({1}, b, torch::kInt64);
  OpOptions so;
  so.label = "global mining batch sizes";
  DTRAIN_RETURN_IF_ERROR(m.coll->AllGather(sizes, mine, so)->Wait());
  const int64_t* size_of = sizes.data_ptr<int64_t>();
  for (int r = 0; r < world; ++r) {
    if (size_of[r] != b) {
      return Status::FailedPrecondition("global mining needs the same local batch on every rank; rank " +
                                        std::to_string(r) + " has " + std::to_string(size_of[r]) +
                                        ", rank " + std::to_string(m.coll->rank()) + " has " + std::to_string(b));
    }
  }
  torch::Tensor local = embeddings.detach().contiguous();
  torch::Tensor all_emb = torch::empty({world * b, embeddings.size(1)}, local.options());
  torch::Tensor all_labels = torch::empty({world * b}, labels.options());
  OpOptions eo, lo;
  eo.label = "global mining embeddings";
  lo.label = "global mining labels";
  auto we = m.coll->AllGather(all_emb, local, eo);
  auto wl = m.coll->AllGather(all_labels, labels.contiguous(), lo);
  DTRAIN_RETURN_IF_ERROR(collective::WaitAll({we, wl}));
  const int64_t r = m.coll->rank();
  std::vector<torch::Tensor> parts;
  if (r > 0) parts.push_back(all_emb.narrow(0, 0, r * b));
  parts.push_back(embeddings);
  if (r + 1 < world) parts.push_back(all_emb.narrow(0, (r + 1) * b, (world - r - 1) * b));
  *out = loss.Compute(torch::cat(parts, 0), all_labels);
  return Status::OK();
}

Status SyncStrategy::FinishGradients() {
  Impl& m = *impl_;
  if (m.coll->size() == 1) return Status::OK();
  const auto start = Clock::now();
  std::shared_ptr<Work> buffers_work;
  torch::Tensor flat_buffers;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    torch::NoGradGuard no_grad;
    // Gradients the hooks did not see (overlap off, or a parameter that got
    // no gradient this step: zeros).
    for (size_t b = m.next_launch; b < m.buckets.size(); ++b) {
      Bucket& bucket = m.buckets[b];
      for (size_t s = 0; s < bucket.params.size(); ++s) {
        if (bucket.ready[s]) continue;
        const torch::Tensor& p = m.params[bucket.params[s]];
        torch::Tensor slice = bucket.flat.narrow(0, bucket.offset[s], p.numel());
        if (p.grad().defined()) {
          slice.copy_(p.grad().reshape({-1}));
        } else {
          slice.zero_();
        }
        bucket.ready[s] = true;
      }
      bucket.pending = 0;
    }
    m.LaunchReady(/*in_backward=*/false);
    if (m.options.sync_buffers && !m.float_buffers.empty()) {
      std::vector<torch::Tensor> flat;
      for (const auto& t : m.float_buffers) flat.push_back(t.reshape({-1}));
      flat_buffers = torch::cat(flat);
      OpOptions o;
      o.label = "BatchNorm statistics";
      buffers_work = m.coll->AllReduce(flat_buffers, ReduceOp::kAverage, o);
    }
  }
  Status first;
  double comm = 0;
  for (size_t b = 0; b < m.buckets.size(); ++b) {
    Bucket& bucket = m.buckets[b];
    Status st = bucket.work->Wait();
    comm += bucket.work->seconds();
    if (!st.ok()) {
      if (first.ok()) first = st;
      continue;
    }
    torch::NoGradGuard no_grad;
    for (size_t s = 0; s < bucket.params.size(); ++s) {
      torch::Tensor p = m.params[bucket.params[s]];
      torch::Tensor averaged = bucket.flat.narrow(0, bucket.offset[s], p.numel()).view(p.sizes());
      if (p.grad().defined()) {
        p.mutable_grad().copy_(averaged);
      } else {
        p.mutable_grad() = averaged.clone();
      }
    }
  }
  if (buffers_work) {
    Status st = buffers_work->Wait();
    if (!st.ok() && first.ok()) first = st;
    if (st.ok()) {
      torch::NoGradGuard no_grad;
      int64_t offset = 0;
      for (auto& t : m.float_buffers) {
        t.copy_(flat_buffers.narrow(0, offset, t.numel()).view(t.sizes()));
        offset += t.numel();
      }
    }
  }
  // Ready for the next step.
  for (Bucket& bucket : m.buckets) {
    bucket.work.reset();
    std::fill(bucket.ready.begin(), bucket.ready.end(), false);
    bucket.pending = bucket.params.size();
  }
  m.next_launch = 0;
  const double wait = Seconds(start, Clock::now());
  ++m.interval_steps;
  m.interval_comm += comm;
  m.interval_wait += wait;
  ++m.totals.steps;
  m.totals.comm_seconds += comm;
  m.totals.wait_seconds += wait;
  return first;
}

double SyncStrategy::AverageAcrossWorkers(double value) {
  Impl& m = *impl_;
  if (m.coll->size() == 1) return value;
  torch::Tensor t = torch::full({1}, value, torch::kFloat64);
  OpOptions o;
  o.label = "logged figures";
  Status st = m.coll->AllReduce(t, ReduceOp::kAverage, o)->Wait();
  if (!st.ok()) {
    spdlog::error("averaging a logged figure across workers failed: {}", st.ToString());
    m.coll->Abort(1);
  }
  return t.item<double>();
}

void SyncStrategy::AddStepMetrics(MetricsLog::Record* record) {
  Impl& m = *impl_;
  if (m.interval_steps == 0) return;
  const double n = static_cast<double>(m.interval_steps);
  record->push_back({"comm_ms", 1e3 * m.interval_comm / n});
  record->push_back({"comm_wait_ms", 1e3 * m.interval_wait / n});
  m.interval_steps = 0;
  m.interval_comm = m.interval_wait = 0;
}

Status SyncStrategy::Finish() {
  const Totals& t = impl_->totals;
  if (t.steps > 0) {
    spdlog::info("sync: {} step(s): all-reduce {:.2f} ms/step, blocked {:.2f} ms/step; {} of {} bucket(s) launched "
                 "during backward",
                 t.steps, 1e3 * t.comm_seconds / static_cast<double>(t.steps),
                 1e3 * t.wait_seconds / static_cast<double>(t.steps), t.buckets_launched_in_backward,
                 t.buckets_launched);
  }
  OpOptions o;
  o.label = "end of training";
  return impl_->coll->Barrier(o)->Wait();
}

}  // namespace dtrain::worker
