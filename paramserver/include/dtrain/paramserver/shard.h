// One parameter-server shard's state: the parameter slices it owns (from the
// shard plan, sharding.h), their optimizer state, and the version counter.
//
// Protocol, per push:
//  1. Validate the whole push before touching anything: every gradient names
//     a slice of this shard exactly (name, offset, length), none twice, and
//     every value is finite (or the push is skipped and counted, by the
//     nonfinite policy). A bad push changes nothing.
//  2. Staleness: a push computed on version b when the shard is at version v
//     is v - b updates stale. With bound tau, v - b > tau is refused with
//     Aborted (the worker re-pulls and recomputes); tau = 0 admits only pushes
//     computed on the current version, which gives sequential consistency.
//     Accepted stalenesses are counted in a histogram.
//  3. Apply: the learning rate is lr_at(v) (the job's schedule at the global
//     step the update makes); each slice is updated under its own mutex (one
//     lock per tensor slice, not one for the shard), by up to apply_threads
//     threads for a large push, then the version becomes v + 1 and each
//     updated slice records it as its last change.
// Steps 2 and 3 are one critical section on the version (pushes are applied
// one at a time, in admission order), so versions count applied updates
// exactly; pulls only take the slice locks and run beside pushes.
//
// Pull(since) returns the slices changed after version `since` (all of them
// for since < 0), each read under its lock, and the version read before
// reading: a pull that runs beside a push may already see some of that push's
// slices, and the next pull (since the returned version) fetches the rest.
//
// Values are shared, not copied, with the pulls that send them
// (VisitChanged hands out a reference to a slice's array): a push that finds
// its slice's array still referenced writes the updated values to a second
// array and swaps the two, so a pull in flight keeps sending the version it
// read while the push goes ahead (copy on write, at no extra pass: the
// optimizer reads one array and writes the other).
//
// Staleness policy WAIT (leases). Instead of refusing stale pushes after the
// fact, the shard makes workers wait before they compute, so that no push is
// ever more than tau updates stale. A worker takes a lease before it reads
// the parameters (AcquireLease, then Pull) and its next push releases it. A
// lease records the version b_w its holder read. With F the leases held by
// other workers and v the current version, a new lease is granted when
//     |F| + max over w in F of (v - b_w)  <=  tau          (0 when F is empty)
// i.e. when every computation in flight, including the new one, would still
// be within the bound if all the others pushed before it. Pushes never wait,
// so workers cannot deadlock; tau = 0 admits one computation at a time
// (sequential consistency); a lease not released within lease_timeout (a dead
// worker) is dropped, and its holder's late push is checked as usual. In a
// job of several shards only shard 0 grants leases, and workers push to
// shard 0 last (service.h), so shard 0's order bounds every shard.
//
// Thread-safety: every method may be called from many threads at once.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/job.pb.h"
#include "dtrain/paramserver/optimizer.h"
#include "dtrain/paramserver/sharding.h"

namespace dtrain::paramserver {

// A read-only view of values for one slice (gradients in a push, values in
// an initialisation).
struct SliceView {
  std::string name;
  int64_t offset = 0;
  int64_t length = 0;
  const float* data = nullptr;
  // Empty for values and gradients; an optimizer slot name for state.
  std::string slot;
  // Instead of `data` (then null): the float32 bytes as runs of received
  // buffers, in order (the service applies pushes straight from them; an
  // element may straddle two runs). Their sizes add up to 4 x length.
  std::vector<std::pair<const uint8_t*, size_t>> pieces;
};

// A slice's values as pulled.
struct SliceValues {
  std::string name;
  int64_t offset = 0;
  std::vector<float> data;
  int64_t changed_at = 0;  // the version of its last update
};

struct ShardOptions {
  int shard = 0;
  std::vector<ParamSlice> slices;  // this shard's part of the plan
  OptimizerConfig optimizer;
  int max_staleness = 4;
  AsyncConfig::StalenessPolicy staleness_policy = AsyncConfig::REJECT;
  // WAIT: a lease not released by a push within this time is dropped.
  std::chrono::milliseconds lease_timeout{120000};
  AsyncConfig::NonFinitePolicy nonfinite_policy = AsyncConfig::NONFINITE_REJECT;
  // The learning rate of the update that takes the shard from version v to
  // v + 1. Default: optimizer.lr, constant.
  std::function<double(int64_t)> lr_at;
  // Threads that apply one push of at least kParallelApplyBytes (its slices
  // split between them, balanced by size; each slice under its own lock as
  // always). Pushes are applied one at a time, so while one is applied the
  // other pushes wait: a second thread uses a core that would idle then.
  // 1: the calling thread alone.
  int apply_threads = 2;
};

// Pushes smaller than this are applied by the calling thread alone: a
// thread's start costs tens of microseconds.
constexpr int64_t kParallelApplyBytes = 4 << 20;

struct PushResult {
  int64_t version = 0;    // the shard's version after the push
  int64_t staleness = 0;  // updates applied since the push's base version
  bool skipped = false;   // dropped by the nonfinite policy
};

struct ShardCounters {
  int64_t applied = 0;
  int64_t rejected_stale = 0;
  int64_t rejected_invalid = 0;
  int64_t skipped_nonfinite = 0;
  std::map<int64_t, int64_t> staleness_histogram;  // staleness -> accepted pushes
  int64_t lease_waits = 0;     // leases that were not granted at once
  double lease_wait_s = 0;     // time spent waiting for them
  int64_t leases_expired = 0;
};

class ParameterShard {
 public:
  ~ParameterShard();
  static Status Create(const ShardOptions& options, std::unique_ptr<ParameterShard>* out);

  // Sets every slice's values and the version (a new job: 0; a resume: the
  // checkpoint's). Views with an empty slot must cover exactly this shard's
  // slices; views with a slot name (a resume) set that optimizer slot of
  // their slice (slots not given start empty), and `optimizer_step` is every
  // slice's update count. InvalidArgument, and nothing changed, otherwise.
  Status Initialize(const std::vector<SliceView>& values, int64_t version, int64_t optimizer_step = 0);

  // `worker` >= 0 releases that worker's lease (WAIT policy).
  Status Push(int64_t base_version, const std::vector<SliceView>& grads, PushResult* result, int worker = -1);
  // WAIT policy: blocks until `worker` may start a computation (see above),
  // then records its lease at the current version. DeadlineExceeded after
  // `timeout`; FailedPrecondition unless the policy is WAIT.
  Status AcquireLease(int worker, std::chrono::milliseconds timeout);
  Status Pull(int64_t since_version, std::vector<SliceValues>* out, int64_t* version) const;
  // As Pull, without the copy: `visit` sees each changed slice's values under
  // its lock (it must not call back into the shard).
  // `owner` keeps the values alive and unchanged for as long as it is held
  // (the service passes it to gRPC with the bytes it sends).
  Status VisitChanged(int64_t since_version, int64_t* version,
                      const std::function<void(const ParamSlice&, const float* values,
                                               const std::shared_ptr<const float[]>& owner)>& visit) const;

  // Everything a checkpoint needs, consistent with one version: `visit` sees
  // every slice's values (slot "") and each non-empty optimizer slot; pushes
  // wait meanwhile. *optimizer_step gets the update count of the slices.
  Status VisitState(int64_t* version, int64_t* optimizer_step,
                    const std::function<void(const ParamSlice&, const std::string& slot, const float* values)>& visit) const;

  // The length of this shard's slice (name, offset), or -1 when it has none.
  int64_t SliceLength(const std::string& name, int64_t offset) const;
  const std::vector<ParamSlice>& slices() const { return options_.slices; }
  int shard() const { return options_.shard; }

  int64_t version() const { return version_.load(); }
  const ShardOptions& options() const { return options_; }
  bool initialized() const { return initialized_.load(); }
  ShardCounters counters() const;

 private:
  struct Slot;
  ParameterShard() = default;
  Status Validate(const std::vector<SliceView>& views, bool need_all, std::vector<Slot*>* slots) const;

  ShardOptions options_;
  ServerOptimizer optimizer_;
  std::map<std::pair<std::string, int64_t>, std::unique_ptr<Slot>> slots_;
  mutable std::mutex apply_mu_;  // steps 2-3: admission and the version; the leases
  std::condition_variable lease_cv_;
  struct Lease {
    int64_t version = 0;
    std::chrono::steady_clock::time_point since;
  };
  std::map<int, Lease> leases_;  // GUARDED_BY(apply_mu_)
  std::atomic<int64_t> version_{0};
  std::atomic<bool> initialized_{false};
  mutable std::mutex counters_mu_;
  ShardCounters counters_;
};

}  // namespace dtrain::paramserver
