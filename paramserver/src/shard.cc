#include "dtrain/paramserver/shard.h"

#include <cmath>
#include <cstring>
#include <set>
#include <thread>
#include <tuple>
#include <algorithm>

namespace dtrain::paramserver {
namespace {

// The index of the first NaN or infinity among the n float32 values at
// `bytes` (any alignment), or n. Blocks are checked by OR-ing a bit test
// (all exponent bits set), which vectorises; only a block that has one is
// searched element by element.
int64_t FirstNonFinite(const uint8_t* bytes, int64_t n) {
  constexpr int64_t kBlock = 4096;
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t end = std::min(n, begin + kBlock);
    uint32_t bad = 0;
    for (int64_t i = begin; i < end; ++i) {
      uint32_t bits;
      std::memcpy(&bits, bytes + 4 * i, sizeof bits);
      bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
    }
    if (bad == 0) continue;
    for (int64_t i = begin; i < end; ++i) {
      float x;
      std::memcpy(&x, bytes + 4 * i, sizeof x);
      if (!std::isfinite(x)) return i;
    }
  }
  return n;
}

// Calls fn(begin, bytes, n) for consecutive runs of a view's elements, where
// `bytes` holds elements [begin, begin + n) as float32 at any alignment: its
// data at once, or each piece of the received buffers where it lies (no
// copy; the optimizer and the check load unaligned). An element split
// between two pieces is joined in a 4-byte buffer and given alone.
void ForEachRun(const SliceView& v, const std::function<void(int64_t, const uint8_t*, int64_t)>& fn) {
  if (v.data != nullptr || v.pieces.empty()) {
    if (v.length > 0) fn(0, reinterpret_cast<const uint8_t*>(v.data), v.length);
    return;
  }
  uint8_t split[sizeof(float)];
  size_t have = 0;  // bytes of a split element gathered so far
  int64_t begin = 0;
  for (auto [p, n] : v.pieces) {
    if (have > 0) {
      const size_t k = std::min(n, sizeof(float) - have);
      std::memcpy(split + have, p, k);
      have += k;
      p += k;
      n -= k;
      if (have < sizeof(float)) continue;
      fn(begin++, split, 1);
      have = 0;
    }
    const int64_t whole = static_cast<int64_t>(n / sizeof(float));
    if (whole > 0) fn(begin, p, whole);
    begin += whole;
    have = n % sizeof(float);
    if (have > 0) std::memcpy(split, p + static_cast<size_t>(whole) * sizeof(float), have);
  }
}

// Copies a view's elements to dst[0, length).
void CopyView(const SliceView& v, float* dst) {
  ForEachRun(v, [dst](int64_t begin, const uint8_t* x, int64_t n) {
    std::memcpy(dst + begin, x, sizeof(float) * static_cast<size_t>(n));
  });
}

}  // namespace

struct ParameterShard::Slot {
  ParamSlice slice;
  std::mutex mu;
  // The values; pulls in flight may hold references (shard.h: copy on write).
  std::shared_ptr<float[]> values;  // GUARDED_BY(mu)
  std::shared_ptr<float[]> spare;   // GUARDED_BY(mu); the other array, when a push needed one
  SlotState state;                  // GUARDED_BY(mu)
  int64_t changed_at = 0;           // GUARDED_BY(mu)
};

ParameterShard::~ParameterShard() = default;

Status ParameterShard::Create(const ShardOptions& options, std::unique_ptr<ParameterShard>* out) {
  std::unique_ptr<ParameterShard> s(new ParameterShard());
  DTRAIN_RETURN_IF_ERROR(ServerOptimizer::Create(options.optimizer, &s->optimizer_));
  if (options.max_staleness < 0) {
    return Status::InvalidArgument("max_staleness must be >= 0, got " + std::to_string(options.max_staleness));
  }
  if (options.apply_threads < 1) {
    return Status::InvalidArgument("apply_threads must be >= 1, got " + std::to_string(options.apply_threads));
  }
  s->options_ = options;
  if (!s->options_.lr_at) {
    const double lr = options.optimizer.lr();
    s->options_.lr_at = [lr](int64_t) { return lr; };
  }
  for (const ParamSlice& p : options.slices) {
    if (p.shard != options.shard) {
      return Status::InvalidArgument("slice " + p.name + "@" + std::to_string(p.offset) + " belongs to shard " +
                                     std::to_string(p.shard) + ", not " + std::to_string(options.shard));
    }
    auto slot = std::make_unique<Slot>();
    slot->slice = p;
    slot->values.reset(new float[static_cast<size_t>(std::max<int64_t>(p.length, 1))]());
    if (!s->slots_.emplace(std::make_pair(p.name, p.offset), std::move(slot)).second) {
      return Status::InvalidArgument("slice " + p.name + "@" + std::to_string(p.offset) + " is listed twice");
    }
  }
  *out = std::move(s);
  return Status::OK();
}

Status ParameterShard::Validate(const std::vector<SliceView>& views, bool need_all, std::vector<Slot*>* slots) const {
  std::set<std::pair<std::string, int64_t>> seen;
  slots->clear();
  for (const SliceView& v : views) {
    const std::string where = "'" + v.name + "' at element " + std::to_string(v.offset);
    if (!v.slot.empty()) {
      return Status::InvalidArgument("slice " + where + " carries optimizer slot '" + v.slot +
                                     "': only an initialisation sets optimizer state");
    }
    auto it = slots_.find({v.name, v.offset});
    if (it == slots_.end()) {
      return Status::InvalidArgument("shard " + std::to_string(options_.shard) + " holds no slice " + where +
                                     " (unknown tensor, or another shard's part)");
    }
    if (v.length != it->second->slice.length) {
      return Status::InvalidArgument("slice " + where + " has " + std::to_string(v.length) + " elements, the shard's has " +
                                     std::to_string(it->second->slice.length));
    }
    if (v.data == nullptr) {
      size_t bytes = 0;
      for (const auto& piece : v.pieces) bytes += piece.second;
      if (bytes != sizeof(float) * static_cast<size_t>(v.length) || (v.pieces.empty() && v.length > 0)) {
        return Status::InvalidArgument("slice " + where + " carries " + std::to_string(bytes) + " bytes of data for " +
                                       std::to_string(v.length) + " elements");
      }
    }
    if (!seen.insert({v.name, v.offset}).second) return Status::InvalidArgument("slice " + where + " appears twice");
    slots->push_back(it->second.get());
  }
  if (need_all && seen.size() != slots_.size()) {
    return Status::InvalidArgument("expected all " + std::to_string(slots_.size()) + " slices of shard " +
                                   std::to_string(options_.shard) + ", got " + std::to_string(seen.size()));
  }
  return Status::OK();
}

Status ParameterShard::Initialize(const std::vector<SliceView>& views, int64_t version, int64_t optimizer_step) {
  std::vector<SliceView> values;
  std::vector<const SliceView*> state;
  for (const SliceView& v : views) {
    if (v.slot.empty()) {
      values.push_back(v);
    } else {
      state.push_back(&v);
    }
  }
  std::vector<Slot*> slots;
  DTRAIN_RETURN_IF_ERROR(Validate(values, true, &slots));
  // Optimizer state: a known slot of a known slice, once each, whole.
  const std::vector<std::string> names = optimizer_.SlotNames();
  std::vector<Slot*> state_slots;
  std::set<std::tuple<std::string, int64_t, std::string>> seen;
  for (const SliceView* v : state) {
    const std::string where = "optimizer slot '" + v->slot + "' of '" + v->name + "' at element " + std::to_string(v->offset);
    if (v->slot == "step" || std::find(names.begin(), names.end(), v->slot) == names.end()) {
      return Status::InvalidArgument(where + ": not a slot of this optimizer");
    }
    auto it = slots_.find({v->name, v->offset});
    if (it == slots_.end()) return Status::InvalidArgument(where + ": shard " + std::to_string(options_.shard) + " holds no such slice");
    if (v->length != it->second->slice.length || (v->data == nullptr && v->pieces.empty() && v->length > 0)) {
      return Status::InvalidArgument(where + " has " + std::to_string(v->length) + " elements, the slice " +
                                     std::to_string(it->second->slice.length));
    }
    if (!seen.insert({v->name, v->offset, v->slot}).second) return Status::InvalidArgument(where + " appears twice");
    state_slots.push_back(it->second.get());
  }
  if (optimizer_step < 0) return Status::InvalidArgument("optimizer step " + std::to_string(optimizer_step) + " < 0");
  std::lock_guard<std::mutex> apply(apply_mu_);
  for (size_t i = 0; i < values.size(); ++i) {
    std::lock_guard<std::mutex> lock(slots[i]->mu);
    CopyView(values[i], slots[i]->values.get());
    slots[i]->state = SlotState();
    slots[i]->state.step = optimizer_step;
    slots[i]->changed_at = version;
  }
  for (size_t i = 0; i < state.size(); ++i) {
    std::lock_guard<std::mutex> lock(state_slots[i]->mu);
    SlotState& st = state_slots[i]->state;
    std::vector<float>& dst = state[i]->slot == "momentum_buffer" ? st.momentum_buffer
                              : state[i]->slot == "exp_avg"       ? st.exp_avg
                                                                  : st.exp_avg_sq;
    dst.resize(static_cast<size_t>(state[i]->length));
    CopyView(*state[i], dst.data());
  }
  version_ = version;
  leases_.clear();
  initialized_ = true;
  lease_cv_.notify_all();
  return Status::OK();
}

Status ParameterShard::AcquireLease(int worker, std::chrono::milliseconds timeout) {
  if (options_.staleness_policy != AsyncConfig::WAIT) {
    return Status::FailedPrecondition("leases are for staleness_policy WAIT");
  }
  if (!initialized_) return Status::FailedPrecondition("shard " + std::to_string(options_.shard) + " is not initialised");
  using SteadyClock = std::chrono::steady_clock;
  const auto start = SteadyClock::now();
  const auto deadline = start + timeout;
  std::unique_lock<std::mutex> lock(apply_mu_);
  leases_.erase(worker);  // a re-pull replaces the worker's own lease
  bool waited = false;
  while (true) {
    const auto now = SteadyClock::now();
    // Drop leases whose holders went silent.
    int64_t expired = 0;
    for (auto it = leases_.begin(); it != leases_.end();) {
      if (now - it->second.since > options_.lease_timeout) {
        it = leases_.erase(it);
        ++expired;
      } else {
        ++it;
      }
    }
    const int64_t v = version_.load();
    int64_t oldest = 0;
    for (const auto& [w, l] : leases_) oldest = std::max(oldest, v - l.version);
    const int64_t in_flight = static_cast<int64_t>(leases_.size());
    if (in_flight == 0 || in_flight + oldest <= options_.max_staleness) {
      leases_[worker] = Lease{v, now};
      std::lock_guard<std::mutex> c(counters_mu_);
      counters_.leases_expired += expired;
      if (waited) {
        ++counters_.lease_waits;
        counters_.lease_wait_s += std::chrono::duration<double>(now - start).count();
      }
      return Status::OK();
    }
    if (expired > 0) {
      std::lock_guard<std::mutex> c(counters_mu_);
      counters_.leases_expired += expired;
    }
    if (now >= deadline) {
      return Status::DeadlineExceeded("worker " + std::to_string(worker) + " waited " +
                                      std::to_string(std::chrono::duration<double>(now - start).count()) +
                                      " s for a lease on shard " + std::to_string(options_.shard) + " (" +
                                      std::to_string(in_flight) + " computation(s) in flight, bound " +
                                      std::to_string(options_.max_staleness) + ")");
    }
    waited = true;
    lease_cv_.wait_for(lock, std::min<SteadyClock::duration>(deadline - now, std::chrono::milliseconds(200)));
  }
}

Status ParameterShard::Push(int64_t base_version, const std::vector<SliceView>& grads, PushResult* result,
                            int worker) {
  auto count = [&](int64_t ShardCounters::*field) {
    std::lock_guard<std::mutex> lock(counters_mu_);
    ++(counters_.*field);
  };
  // Whatever happens to this push, its worker's computation is over.
  struct Release {
    ParameterShard* shard;
    int worker;
    ~Release() {
      if (worker < 0) return;
      {
        std::lock_guard<std::mutex> lock(shard->apply_mu_);
        shard->leases_.erase(worker);
      }
      shard->lease_cv_.notify_all();
    }
  } release{this, worker};
  if (!initialized_) return Status::FailedPrecondition("shard " + std::to_string(options_.shard) + " is not initialised");
  // 1. Validate everything first.
  std::vector<Slot*> slots;
  Status valid = Validate(grads, false, &slots);
  if (!valid.ok()) {
    count(&ShardCounters::rejected_invalid);
    return valid;
  }
  for (const SliceView& g : grads) {
    int64_t i = g.length;
    ForEachRun(g, [&i](int64_t begin, const uint8_t* x, int64_t n) {
      const int64_t j = FirstNonFinite(x, n);
      if (j < n) i = std::min(i, begin + j);
    });
    if (i < g.length) {
      const std::string what = "gradient of '" + g.name + "' is not finite at element " + std::to_string(g.offset + i);
      if (options_.nonfinite_policy == AsyncConfig::NONFINITE_SKIP) {
        count(&ShardCounters::skipped_nonfinite);
        result->version = version_.load();
        result->staleness = result->version - base_version;
        result->skipped = true;
        return Status::OK();
      }
      count(&ShardCounters::rejected_invalid);
      return Status::InvalidArgument(what + " (the push was refused; nonfinite_policy NONFINITE_REJECT)");
    }
  }
  // 2-3. Admission and apply, one push at a time.
  std::lock_guard<std::mutex> apply(apply_mu_);
  const int64_t v = version_.load();
  const int64_t staleness = v - base_version;
  if (base_version > v) {
    count(&ShardCounters::rejected_invalid);
    return Status::InvalidArgument("push computed on version " + std::to_string(base_version) +
                                   ", ahead of the shard's " + std::to_string(v));
  }
  if (staleness > options_.max_staleness) {
    count(&ShardCounters::rejected_stale);
    return Status::Aborted("push computed on version " + std::to_string(base_version) + " is " +
                           std::to_string(staleness) + " updates stale (shard " + std::to_string(options_.shard) +
                           " at " + std::to_string(v) + ", bound " + std::to_string(options_.max_staleness) +
                           "): pull and recompute");
  }
  const double lr = options_.lr_at(v);
  auto apply_slice = [&](size_t i) {
    Slot* s = slots[i];
    std::lock_guard<std::mutex> lock(s->mu);
    const ServerOptimizer::Step step = optimizer_.Begin(grads[i].length, lr, &s->state);
    float* in = s->values.get();
    float* out = in;
    // References are taken only under this lock, so a count of 1 means
    // no pull holds these values; otherwise write the update elsewhere.
    if (s->values.use_count() > 1) {
      if (!s->spare || s->spare.use_count() > 1) {
        s->spare.reset(new float[static_cast<size_t>(std::max<int64_t>(grads[i].length, 1))]);
      }
      out = s->spare.get();
    }
    ForEachRun(grads[i], [&](int64_t begin, const uint8_t* g, int64_t n) { optimizer_.Run(step, in, out, g, begin, n); });
    if (out != in) std::swap(s->values, s->spare);
    s->changed_at = v + 1;
  };
  // Threads for this push: consecutive slices, about equal elements each.
  int64_t elements = 0;
  for (const SliceView& g : grads) elements += g.length;
  const bool large = elements * static_cast<int64_t>(sizeof(float)) >= kParallelApplyBytes;
  const int threads = large ? static_cast<int>(std::min<size_t>(options_.apply_threads, grads.size())) : 1;
  std::vector<std::thread> helpers;
  size_t next = 0;
  int64_t done = 0;
  for (int t = 0; t < threads; ++t) {
    const size_t begin = next;
    // Take slices until this thread has its share of what is left.
    const int64_t share = (elements - done) / (threads - t);
    int64_t taken = 0;
    while (next < grads.size() && (taken < share || next == begin) &&
           grads.size() - next > static_cast<size_t>(threads - t - 1)) {
      taken += grads[next++].length;
    }
    if (t == threads - 1) next = grads.size();
    done += taken;
    const size_t end = next;
    auto run = [&apply_slice, begin, end] {
      for (size_t i = begin; i < end; ++i) apply_slice(i);
    };
    if (t == threads - 1) {
      run();  // the last share on this thread
    } else {
      helpers.emplace_back(run);
    }
  }
  for (std::thread& h : helpers) h.join();
  version_ = v + 1;
  {
    std::lock_guard<std::mutex> lock(counters_mu_);
    ++counters_.applied;
    ++counters_.staleness_histogram[staleness];
  }
  result->version = v + 1;
  result->staleness = staleness;
  result->skipped = false;
  return Status::OK();
}

Status ParameterShard::VisitChanged(
    int64_t since_version, int64_t* version,
    const std::function<void(const ParamSlice&, const float*, const std::shared_ptr<const float[]>&)>& visit) const {
  if (!initialized_) return Status::FailedPrecondition("shard " + std::to_string(options_.shard) + " is not initialised");
  *version = version_.load();
  for (const auto& [key, slot] : slots_) {
    std::lock_guard<std::mutex> lock(slot->mu);
    if (since_version >= 0 && slot->changed_at <= since_version) continue;
    const std::shared_ptr<const float[]> owner = slot->values;
    visit(slot->slice, owner.get(), owner);
  }
  return Status::OK();
}

Status ParameterShard::VisitState(
    int64_t* version, int64_t* optimizer_step,
    const std::function<void(const ParamSlice&, const std::string&, const float*)>& visit) const {
  if (!initialized_) return Status::FailedPrecondition("shard " + std::to_string(options_.shard) + " is not initialised");
  std::lock_guard<std::mutex> apply(apply_mu_);
  *version = version_.load();
  *optimizer_step = 0;
  for (const auto& [key, slot] : slots_) {
    std::lock_guard<std::mutex> lock(slot->mu);
    *optimizer_step = std::max(*optimizer_step, slot->state.step);
    visit(slot->slice, "", slot->values.get());
    const SlotState& st = slot->state;
    if (!st.momentum_buffer.empty()) visit(slot->slice, "momentum_buffer", st.momentum_buffer.data());
    if (!st.exp_avg.empty()) visit(slot->slice, "exp_avg", st.exp_avg.data());
    if (!st.exp_avg_sq.empty()) visit(slot->slice, "exp_avg_sq", st.exp_avg_sq.data());
  }
  return Status::OK();
}

Status ParameterShard::Pull(int64_t since_version, std::vector<SliceValues>* out, int64_t* version) const {
  out->clear();
  return VisitChanged(since_version, version, [&](const ParamSlice& s, const float* v, const std::shared_ptr<const float[]>&) {
    out->push_back(SliceValues{s.name, s.offset, std::vector<float>(v, v + s.length), 0});
  });
}

int64_t ParameterShard::SliceLength(const std::string& name, int64_t offset) const {
  auto it = slots_.find({name, offset});
  return it == slots_.end() ? -1 : it->second->slice.length;
}

ShardCounters ParameterShard::counters() const {
  std::lock_guard<std::mutex> lock(counters_mu_);
  return counters_;
}

}  // namespace dtrain::paramserver
