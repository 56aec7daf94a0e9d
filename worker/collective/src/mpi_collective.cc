#include "dtrain/worker/collective/mpi_collective.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <mpi.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <functional>
#include <list>
#include <mutex>
#include <thread>

#include "dtrain/common/env.h"

namespace dtrain::collective {
namespace {

using Clock = std::chrono::steady_clock;

std::string MpiError(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, buf, &len);
  return std::string(buf, static_cast<size_t>(len));
}

// ---- reductions of 16-bit floats (MPI has no such type) ------------------------

template <typename T>
void SumHalves(void* in, void* inout, int* len, MPI_Datatype*) {
  const T* a = static_cast<const T*>(in);
  T* b = static_cast<T*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = static_cast<T>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
}

template <typename T>
void MaxHalves(void* in, void* inout, int* len, MPI_Datatype*) {
  const T* a = static_cast<const T*>(in);
  T* b = static_cast<T*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = static_cast<T>(std::max(static_cast<float>(a[i]), static_cast<float>(b[i])));
}

struct HalfOps {
  MPI_Op sum_fp16 = MPI_OP_NULL, max_fp16 = MPI_OP_NULL, sum_bf16 = MPI_OP_NULL, max_bf16 = MPI_OP_NULL;
};

HalfOps& GetHalfOps() {
  static HalfOps ops;
  return ops;
}

struct RuntimeState {
  std::mutex mu;
  bool initialized = false;
  bool finalized = false;
};

RuntimeState& Runtime() {
  static RuntimeState s;
  return s;
}

// Collective threads left inside a blocking MPI call by a broken (timed-out)
// MpiCollective whose object is gone. MPI_Finalize must not run under them.
std::atomic<int> g_threads_left_in_mpi{0};

// ---- Work ------------------------------------------------------------------------

// How long a hand-off between threads spins (yielding the core to any other
// runnable thread: this machine runs several ranks per core) before it blocks
// on a condition variable, whose wake-up costs 20-40 us here: a waiter spins
// up to kWaitSpinUs, the collective thread up to kQueueSpinUs for the next
// operation.
constexpr int kWaitSpinUs = 1000;
constexpr int kQueueSpinUs = 50;

class WorkImpl : public Work {
 public:
  Status Wait() override {
    // While a thread waits here, the point-to-point thread polls without
    // sleeping (set_waiting_hook): the waiter's core is idle anyway.
    struct Waiting {
      const std::function<void(int)>* hook;  // null: nothing to announce
      ~Waiting() {
        if (hook) (*hook)(-1);
      }
    } waiting{waiting_hook_ && !done_flag_.load(std::memory_order_acquire) ? &waiting_hook_ : nullptr};
    if (waiting.hook) (*waiting.hook)(+1);
    // Spin for a few tens of microseconds first: most small operations
    // complete within that, and a sleeping waiter costs a wake-up.
    const auto spin_until = Clock::now() + std::chrono::microseconds(kWaitSpinUs);
    while (!done_flag_.load(std::memory_order_acquire) && Clock::now() < spin_until) {
      std::this_thread::yield();
    }
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return done_; });
    if (!finished_) {
      finished_ = true;
      if (status_.ok() && finish_) {
        try {
          finish_();
        } catch (const std::exception& e) {
          status_ = Status::Internal(std::string("finishing ") + label_ + ": " + e.what());
        }
      }
      finish_ = nullptr;
    }
    return status_;
  }
  bool IsCompleted() override {
    std::lock_guard<std::mutex> lock(mu_);
    return done_;
  }
  double seconds() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return seconds_;
  }

  void Complete(Status st, double seconds) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (done_) return;
      status_ = std::move(st);
      seconds_ = seconds;
      done_ = true;
      done_flag_.store(true, std::memory_order_release);
    }
    cv_.notify_all();
  }
  // Runs on the waiting thread after a successful completion (copy back,
  // decompress, divide).
  void set_finish(std::function<void()> f) { finish_ = std::move(f); }
  void set_label(std::string label) { label_ = std::move(label); }
  // Called with +1 when a thread starts waiting for this operation and -1
  // when it stops; set before the operation is queued.
  void set_waiting_hook(std::function<void(int)> hook) { waiting_hook_ = std::move(hook); }

 private:
  std::function<void(int)> waiting_hook_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::atomic<bool> done_flag_{false};  // done_, readable without the lock
  bool finished_ = false;
  Status status_;
  double seconds_ = 0;
  std::function<void()> finish_;
  std::string label_;
};

std::shared_ptr<Work> Failed(Status st) {
  auto w = std::make_shared<WorkImpl>();
  w->Complete(std::move(st), 0);
  return w;
}

enum class Kind { kAllReduce, kBroadcast, kAllGather, kBarrier, kSend, kRecv };

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kAllReduce: return "allreduce";
    case Kind::kBroadcast: return "broadcast";
    case Kind::kAllGather: return "allgather";
    case Kind::kBarrier: return "barrier";
    case Kind::kSend: return "send";
    case Kind::kRecv: return "recv";
  }
  return "?";
}

bool IsCollective(Kind k) { return k != Kind::kSend && k != Kind::kRecv; }

// One operation, prepared by the caller's thread, driven by the comm thread.
struct Op {
  Kind kind = Kind::kBarrier;
  std::string label;
  std::chrono::milliseconds timeout{0};
  // What MPI reads and writes (host memory, contiguous; already converted to
  // the wire type). Kept alive until completion.
  at::Tensor buffer;
  at::Tensor output;  // AllGather
  MPI_Datatype dtype = MPI_BYTE;
  int count = 0;
  MPI_Op mpi_op = MPI_OP_NULL;
  int root = 0;  // Broadcast
  int peer = -1;  // Send/Recv
  int tag = 0;
  int64_t seq = -1;  // collectives: position in the issue order
  std::shared_ptr<WorkImpl> work;
  // Set by the thread that runs the operation:
  MPI_Request request = MPI_REQUEST_NULL;  // Send/Recv
  Clock::time_point start;
};

}  // namespace

// ---- MpiRuntime --------------------------------------------------------------------

bool MpiRuntime::LaunchedByMpirun() {
  for (const char* name : {env::kOmpiWorldSize, env::kPmiSize, env::kPmixRank}) {
    if (env::Get(name, nullptr) != nullptr) return true;
  }
  return false;
}

Status MpiRuntime::Init() {
  RuntimeState& rt = Runtime();
  std::lock_guard<std::mutex> lock(rt.mu);
  if (rt.initialized) return Status::OK();
  if (rt.finalized) return Status::FailedPrecondition("MPI was already finalized in this process");
  int provided = 0;
  int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided);
  if (rc != MPI_SUCCESS) return Status::Internal("MPI_Init_thread failed: " + MpiError(rc));
  if (provided < MPI_THREAD_MULTIPLE) {
    return Status::FailedPrecondition("this MPI library does not provide MPI_THREAD_MULTIPLE (got level " +
                                      std::to_string(provided) + "); dtrain needs an Open MPI built with "
                                      "thread support (Debian's is)");
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  HalfOps& ops = GetHalfOps();
  MPI_Op_create(&SumHalves<c10::Half>, 1, &ops.sum_fp16);
  MPI_Op_create(&MaxHalves<c10::Half>, 1, &ops.max_fp16);
  MPI_Op_create(&SumHalves<c10::BFloat16>, 1, &ops.sum_bf16);
  MPI_Op_create(&MaxHalves<c10::BFloat16>, 1, &ops.max_bf16);
  rt.initialized = true;
  return Status::OK();
}

bool MpiRuntime::initialized() {
  RuntimeState& rt = Runtime();
  std::lock_guard<std::mutex> lock(rt.mu);
  return rt.initialized && !rt.finalized;
}

int MpiRuntime::world_rank() {
  if (!initialized()) return 0;
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int MpiRuntime::world_size() {
  if (!initialized()) return 1;
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

void MpiRuntime::Finalize() {
  RuntimeState& rt = Runtime();
  std::lock_guard<std::mutex> lock(rt.mu);
  if (!rt.initialized || rt.finalized) return;
  // A collective that timed out may have left its thread inside MPI (waiting
  // for a peer that may still come): give it a moment, then end the job
  // rather than finalize under it.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (g_threads_left_in_mpi.load() > 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (g_threads_left_in_mpi.load() > 0) {
    std::fprintf(stderr, "dtrain: a collective that timed out is still inside MPI; ending the job instead of "
                         "finalizing MPI\n");
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  HalfOps& ops = GetHalfOps();
  for (MPI_Op* op : {&ops.sum_fp16, &ops.max_fp16, &ops.sum_bf16, &ops.max_bf16}) {
    if (*op != MPI_OP_NULL) MPI_Op_free(op);
  }
  MPI_Finalize();
  rt.finalized = true;
}

void MpiRuntime::Abort(int exit_code) {
  std::fflush(stdout);
  std::fflush(stderr);
  if (initialized()) MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::_Exit(exit_code);
}

// ---- MpiCollective -----------------------------------------------------------------

struct MpiCollective::Impl {
  MpiCollectiveOptions options;
  MPI_Comm comm = MPI_COMM_NULL;       // collectives
  MPI_Comm p2p_comm = MPI_COMM_NULL;   // Send/Recv
  MPI_Comm inspector = MPI_COMM_NULL;  // stall announcements
  int rank = 0;
  int size = 1;
  std::atomic<int64_t> bytes_sent{0};

  std::mutex mu;
  std::condition_variable coll_cv;      // collective queued, stop, broken
  std::condition_variable p2p_cv;       // send/recv queued, stop
  // Wakes the point-to-point thread from a sleep between polls. Shared with
  // the Work of every send/recv, which may outlive this object.
  struct P2pWake {
    std::atomic<int> waiters{0};       // threads inside Wait() of a send/recv
    std::atomic<int64_t> queued{0};    // sends/recvs queued so far
    std::mutex mu;
    std::condition_variable cv;
  };
  std::shared_ptr<P2pWake> p2p_wake = std::make_shared<P2pWake>();
  std::condition_variable watchdog_cv;  // stop, broken
  std::condition_variable done_cv;      // a collective finished (the destructor waits)
  std::atomic<int64_t> coll_queued{0};  // collectives enqueued so far (for spinning)
  std::deque<std::unique_ptr<Op>> coll_queue;  // GUARDED_BY(mu)
  std::deque<std::unique_ptr<Op>> p2p_queue;   // GUARDED_BY(mu)
  bool stop = false;                    // GUARDED_BY(mu)
  int64_t next_seq = 0;                 // GUARDED_BY(mu)
  std::string broken;                   // GUARDED_BY(mu); why, once broken
  Op* current = nullptr;                // GUARDED_BY(mu); the collective inside MPI now
  bool left_in_mpi = false;             // GUARDED_BY(mu); counted in g_threads_left_in_mpi
  // Collectives given up after a timeout: MPI may still write into their
  // buffers, so they are kept alive (never freed) once the collective broke.
  std::vector<std::unique_ptr<Op>> abandoned;  // GUARDED_BY(mu)

  std::thread coll_thread, p2p_thread, watchdog_thread;

  // Watchdog thread only.
  std::vector<int64_t> peer_waiting;  // latest collective seq each rank announced waiting in (-1: none)
  int64_t announce_buf = -1;
  std::vector<int64_t> announce_out;
  MPI_Request announce_recv = MPI_REQUEST_NULL;

  std::shared_ptr<Work> Enqueue(std::unique_ptr<Op> op);
  void CollectiveLoop();
  void P2pLoop();
  void WatchdogLoop();
  int RunCollective(Op& op);
  void Announce(int64_t seq);
  void PollAnnouncements();
  std::string StallReport(const Op& op) const;
};

std::shared_ptr<Work> MpiCollective::Impl::Enqueue(std::unique_ptr<Op> op) {
  auto work = std::make_shared<WorkImpl>();
  op->work = work;
  if (!IsCollective(op->kind)) {
    work->set_waiting_hook([wake = p2p_wake](int delta) {
      if (wake->waiters.fetch_add(delta, std::memory_order_acq_rel) == 0 && delta > 0) wake->cv.notify_one();
    });
  }
  if (op->label.empty()) op->label = KindName(op->kind);
  work->set_label(op->label);
  if (op->timeout.count() <= 0) op->timeout = options.timeout;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (!broken.empty()) {
      work->Complete(Status::Aborted(std::string(KindName(op->kind)) + " '" + op->label +
                                     "' not started: this collective is broken (" + broken + ")"),
                     0);
      return work;
    }
    if (IsCollective(op->kind)) {
      op->seq = next_seq++;
      coll_queue.push_back(std::move(op));
      coll_queued.fetch_add(1, std::memory_order_release);
      coll_cv.notify_one();
    } else {
      p2p_queue.push_back(std::move(op));
      p2p_cv.notify_one();
      p2p_wake->queued.fetch_add(1, std::memory_order_release);
      p2p_wake->cv.notify_one();
    }
  }
  return work;
}

// The blocking MPI call of a collective (Open MPI's tuned algorithms, which
// beat the non-blocking ones of libnbc by 1.5-10x here: docs/benchmarks.md).
int MpiCollective::Impl::RunCollective(Op& op) {
  void* buf = op.buffer.defined() ? op.buffer.data_ptr() : nullptr;
  int type_size = 1;
  MPI_Type_size(op.dtype, &type_size);
  if (op.kind != Kind::kBarrier) bytes_sent += static_cast<int64_t>(op.count) * type_size;
  switch (op.kind) {
    case Kind::kAllReduce: return MPI_Allreduce(MPI_IN_PLACE, buf, op.count, op.dtype, op.mpi_op, comm);
    case Kind::kBroadcast: return MPI_Bcast(buf, op.count, op.dtype, op.root, comm);
    case Kind::kAllGather:
      return MPI_Allgather(buf, op.count, op.dtype, op.output.data_ptr(), op.count, op.dtype, comm);
    case Kind::kBarrier: return MPI_Barrier(comm);
    default: return MPI_ERR_OTHER;
  }
}

void MpiCollective::Impl::CollectiveLoop() {
  int64_t taken = 0;
  while (true) {
    // The next collective usually follows within microseconds (the buckets
    // of one backward): spin briefly before sleeping.
    const auto spin_until = Clock::now() + std::chrono::microseconds(kQueueSpinUs);
    while (coll_queued.load(std::memory_order_acquire) == taken && Clock::now() < spin_until) {
      std::this_thread::yield();
    }
    std::unique_ptr<Op> op;
    {
      std::unique_lock<std::mutex> lock(mu);
      coll_cv.wait(lock, [this] { return stop || !coll_queue.empty() || !broken.empty(); });
      if (!broken.empty() || (stop && coll_queue.empty())) return;
      op = std::move(coll_queue.front());
      coll_queue.pop_front();
      ++taken;
      op->start = Clock::now();
      current = op.get();
    }
    const int rc = RunCollective(*op);
    const double secs = std::chrono::duration<double>(Clock::now() - op->start).count();
    {
      std::lock_guard<std::mutex> lock(mu);
      current = nullptr;
      if (left_in_mpi) {
        left_in_mpi = false;
        g_threads_left_in_mpi.fetch_sub(1);
      }
      if (!broken.empty()) {
        // The watchdog failed it (and everything after it) while MPI had it.
        abandoned.push_back(std::move(op));
        done_cv.notify_all();
        return;
      }
    }
    op->work->Complete(rc == MPI_SUCCESS ? Status::OK()
                                         : Status::Internal(std::string(KindName(op->kind)) + " '" + op->label +
                                                            "': " + MpiError(rc)),
                       secs);
    std::lock_guard<std::mutex> lock(mu);
    if (stop) done_cv.notify_all();
  }
}

// Sends and receives: non-blocking, polled, each with its own deadline. It
// spins after progress, polls flat out while a thread waits for one of its
// transfers, and otherwise sleeps between polls (a new transfer wakes it).
void MpiCollective::Impl::P2pLoop() {
  std::list<std::unique_ptr<Op>> in_flight;
  auto last_progress = Clock::now();
  int sleep_us = 1;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu);
      if (in_flight.empty()) {
        p2p_cv.wait(lock, [this] { return stop || !p2p_queue.empty(); });
        if (stop && p2p_queue.empty()) return;
      }
      if (!broken.empty()) {
        const Status st = Status::Aborted("this collective is broken (" + broken + ")");
        lock.unlock();
        for (auto& op : in_flight) op->work->Complete(st, 0);  // requests left to MPI_Abort
        return;
      }
      while (!p2p_queue.empty()) {
        in_flight.push_back(std::move(p2p_queue.front()));
        p2p_queue.pop_front();
        Op& op = *in_flight.back();
        op.start = Clock::now();
        void* buf = op.buffer.data_ptr();
        const int rc = op.kind == Kind::kSend
                           ? MPI_Isend(buf, op.count, op.dtype, op.peer, op.tag, p2p_comm, &op.request)
                           : MPI_Irecv(buf, op.count, op.dtype, op.peer, op.tag, p2p_comm, &op.request);
        if (rc != MPI_SUCCESS) {
          op.work->Complete(Status::Internal(std::string(KindName(op.kind)) + " '" + op.label + "': " + MpiError(rc)), 0);
          in_flight.pop_back();
        } else if (op.kind == Kind::kSend) {
          bytes_sent += op.count;
        }
      }
    }
    bool progress = false;
    const auto now = Clock::now();
    for (auto it = in_flight.begin(); it != in_flight.end();) {
      Op& op = **it;
      int flag = 0;
      const int rc = MPI_Test(&op.request, &flag, MPI_STATUS_IGNORE);
      const double secs = std::chrono::duration<double>(now - op.start).count();
      if (rc != MPI_SUCCESS || flag) {
        op.work->Complete(rc == MPI_SUCCESS ? Status::OK()
                                            : Status::Internal(std::string(KindName(op.kind)) + " '" + op.label +
                                                               "': " + MpiError(rc)),
                          secs);
        it = in_flight.erase(it);
        progress = true;
        continue;
      }
      if (now - op.start > op.timeout) {
        const std::string report = StallReport(op);
        spdlog::error("point-to-point timeout: {}", report);
        op.work->Complete(Status::DeadlineExceeded(report), secs);
        {
          std::lock_guard<std::mutex> lock(mu);
          if (broken.empty()) broken = "timed out: " + report;
          coll_cv.notify_all();
          watchdog_cv.notify_all();
          done_cv.notify_all();
        }
        // The request stays with MPI (the process is expected to Abort());
        // its buffer is kept alive.
        std::lock_guard<std::mutex> lock(mu);
        abandoned.push_back(std::move(*it));
        it = in_flight.erase(it);
        continue;
      }
      ++it;
    }
    if (progress) {
      last_progress = now;
      sleep_us = 1;
    } else if (options.poll_while_waiting && p2p_wake->waiters.load(std::memory_order_acquire) > 0) {
      // A thread is blocked on a transfer, so its core is idle: poll flat
      // out, yielding to any other runnable thread.
      std::this_thread::yield();
    } else if (now - last_progress > std::chrono::microseconds(options.spin_us)) {
      // Sleep between polls, but start a newly queued transfer, or poll for
      // a thread that starts waiting, at once.
      P2pWake& wake = *p2p_wake;
      const int64_t seen = wake.queued.load(std::memory_order_acquire);
      std::unique_lock<std::mutex> lock(wake.mu);
      wake.cv.wait_for(lock, std::chrono::microseconds(sleep_us), [&] {
        return (options.poll_while_waiting && wake.waiters.load(std::memory_order_acquire) > 0) ||
               wake.queued.load(std::memory_order_acquire) != seen;
      });
      sleep_us = std::min(sleep_us * 2, std::max(options.max_sleep_us, 1));
    }
  }
}

void MpiCollective::Impl::Announce(int64_t seq) {
  // Tell every peer "rank `rank` is waiting in collective #seq".
  announce_out.assign(static_cast<size_t>(size), seq);
  for (int r = 0; r < size; ++r) {
    if (r == rank) continue;
    MPI_Request req;
    if (MPI_Isend(&announce_out[static_cast<size_t>(r)], 1, MPI_INT64_T, r, 0, inspector, &req) == MPI_SUCCESS) {
      MPI_Request_free(&req);  // a few bytes, sent eagerly
    }
  }
}

void MpiCollective::Impl::PollAnnouncements() {
  while (announce_recv != MPI_REQUEST_NULL) {
    int flag = 0;
    MPI_Status status;
    if (MPI_Test(&announce_recv, &flag, &status) != MPI_SUCCESS || !flag) return;
    const int src = status.MPI_SOURCE;
    if (src >= 0 && src < size) {
      peer_waiting[static_cast<size_t>(src)] = std::max(peer_waiting[static_cast<size_t>(src)], announce_buf);
    }
    MPI_Irecv(&announce_buf, 1, MPI_INT64_T, MPI_ANY_SOURCE, 0, inspector, &announce_recv);
  }
}

// The stall inspector: looks at the running collective every `tick` (a
// twentieth of the default timeout, at most 100 ms), so that starting a
// collective costs no wake-up of this thread.
void MpiCollective::Impl::WatchdogLoop() {
  const auto tick = std::min<Clock::duration>(std::chrono::milliseconds(100), options.timeout / 20);
  std::unique_lock<std::mutex> lock(mu);
  const Op* announced_for = nullptr;
  while (broken.empty() && !(stop && current == nullptr && coll_queue.empty())) {
    Op* op = current;
    const auto now = Clock::now();
    if (op != nullptr) {
      const auto announce_at =
          op->start + std::chrono::duration_cast<Clock::duration>(op->timeout * options.stall_fraction);
      if (now >= op->start + op->timeout) {
        // Deadline: who had announced? Then fail it and everything queued.
        lock.unlock();
        PollAnnouncements();
        lock.lock();
        if (current == op && broken.empty()) {
          const std::string report = StallReport(*op);
          spdlog::error("collective timeout: {}", report);
          broken = "timed out: " + report;
          op->work->Complete(Status::DeadlineExceeded(report),
                             std::chrono::duration<double>(now - op->start).count());
          const Status st = Status::Aborted("this collective is broken (" + broken + ")");
          for (auto& q : coll_queue) q->work->Complete(st, 0);
          for (auto& q : coll_queue) abandoned.push_back(std::move(q));
          coll_queue.clear();
          coll_cv.notify_all();
          p2p_cv.notify_all();
          done_cv.notify_all();
          return;
        }
        continue;
      }
      if (announced_for != op && size > 1 && now >= announce_at) {
        const int64_t seq = op->seq;
        announced_for = op;
        lock.unlock();
        Announce(seq);
        lock.lock();
      }
    }
    if (size > 1) {
      lock.unlock();
      PollAnnouncements();
      lock.lock();
    }
    watchdog_cv.wait_for(lock, tick,
                         [this] { return !broken.empty() || (stop && current == nullptr && coll_queue.empty()); });
  }
}

std::string MpiCollective::Impl::StallReport(const Op& op) const {
  const double secs = std::chrono::duration<double>(op.timeout).count();
  char head[64];
  std::snprintf(head, sizeof head, "%.1f s", secs);
  std::string msg = std::string(KindName(op.kind)) + " '" + op.label + "' ";
  if (!IsCollective(op.kind)) {
    return msg + (op.kind == Kind::kSend ? "to" : "from") + " rank " + std::to_string(op.peer) + " (tag " +
           std::to_string(op.tag) + ") did not complete within " + head + " on rank " + std::to_string(rank) +
           ": rank " + std::to_string(op.peer) + " did not post the matching " +
           (op.kind == Kind::kSend ? "recv" : "send");
  }
  std::string missing, arrived = std::to_string(rank);
  for (int r = 0; r < size; ++r) {
    if (r == rank) continue;
    if (peer_waiting[static_cast<size_t>(r)] >= op.seq) {
      arrived += ", " + std::to_string(r);
    } else {
      missing += (missing.empty() ? "" : ", ") + std::to_string(r);
    }
  }
  msg += "(collective #" + std::to_string(op.seq) + ") did not complete within " + head + " on rank " +
         std::to_string(rank) + ": ";
  if (missing.empty()) {
    msg += "every rank reached it (" + arrived + ") but it did not finish (a network or MPI failure)";
  } else {
    msg += "rank(s) " + missing + " had not arrived; rank(s) " + arrived + " were waiting in it";
  }
  return msg;
}

namespace {

Status Dtype(const at::Tensor& t, MPI_Datatype* out) {
  switch (t.scalar_type()) {
    case at::kFloat: *out = MPI_FLOAT; return Status::OK();
    case at::kDouble: *out = MPI_DOUBLE; return Status::OK();
    case at::kInt: *out = MPI_INT32_T; return Status::OK();
    case at::kLong: *out = MPI_INT64_T; return Status::OK();
    case at::kByte: *out = MPI_UINT8_T; return Status::OK();
    case at::kHalf:
    case at::kBFloat16: *out = MPI_UINT16_T; return Status::OK();
    default:
      return Status::InvalidArgument(std::string("MPI collective: unsupported dtype ") +
                                     std::string(c10::toString(t.scalar_type())));
  }
}

Status CheckTensor(const at::Tensor& t, const char* what) {
  if (!t.defined()) return Status::InvalidArgument(std::string(what) + ": undefined tensor");
  if (!t.is_contiguous()) return Status::InvalidArgument(std::string(what) + ": tensor must be contiguous");
  if (!t.is_cpu() && !t.is_cuda()) return Status::InvalidArgument(std::string(what) + ": CPU or CUDA tensors only");
  if (t.numel() * static_cast<int64_t>(t.element_size()) > INT_MAX) {
    return Status::InvalidArgument(std::string(what) + ": tensor larger than 2 GiB; split it");
  }
  return Status::OK();
}

// Host buffer for MPI: the tensor itself when on the CPU, else a host copy.
at::Tensor HostBuffer(const at::Tensor& t, bool copy_contents) {
  if (t.is_cpu()) return t;
  return copy_contents ? t.to(at::kCPU) : at::empty(t.sizes(), t.options().device(at::kCPU));
}

std::unique_ptr<Op> NewOp(Kind kind, const OpOptions& options) {
  auto op = std::make_unique<Op>();
  op->kind = kind;
  op->label = options.label;
  op->timeout = options.timeout;
  return op;
}

// When `staging` is a host copy of `target` (a CUDA tensor), copies it back
// once the operation has completed.
std::shared_ptr<Work> CopyBackWhenDone(std::shared_ptr<Work> work, at::Tensor target, at::Tensor staging) {
  if (!staging.is_same(target)) {
    static_cast<WorkImpl*>(work.get())->set_finish([target, staging]() mutable {
      torch::NoGradGuard no_grad;
      target.copy_(staging);
    });
  }
  return work;
}

}  // namespace

MpiCollective::MpiCollective(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Status MpiCollective::Create(const MpiCollectiveOptions& options, std::unique_ptr<MpiCollective>* out) {
  return CreateSplit(options, 0, out);
}

Status MpiCollective::CreateSplit(const MpiCollectiveOptions& options, int color,
                                  std::unique_ptr<MpiCollective>* out) {
  if (!MpiRuntime::initialized()) return Status::FailedPrecondition("MpiCollective: MpiRuntime::Init() first");
  if (options.timeout.count() <= 0) return Status::InvalidArgument("MpiCollective: timeout must be > 0");
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  if (const char* y = std::getenv("OMPI_MCA_mpi_yield_when_idle"); y != nullptr && std::string(y) == "1") {
    impl->options.poll_while_waiting = false;  // ranks share cores
  }
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  int rc = MPI_Comm_split(MPI_COMM_WORLD, color, world_rank, &impl->comm);
  if (rc != MPI_SUCCESS) return Status::Internal("MPI_Comm_split: " + MpiError(rc));
  MPI_Comm_set_errhandler(impl->comm, MPI_ERRORS_RETURN);
  MPI_Comm_dup(impl->comm, &impl->p2p_comm);
  MPI_Comm_dup(impl->comm, &impl->inspector);
  MPI_Comm_set_errhandler(impl->p2p_comm, MPI_ERRORS_RETURN);
  MPI_Comm_set_errhandler(impl->inspector, MPI_ERRORS_RETURN);
  MPI_Comm_rank(impl->comm, &impl->rank);
  MPI_Comm_size(impl->comm, &impl->size);
  impl->peer_waiting.assign(static_cast<size_t>(impl->size), -1);
  MPI_Irecv(&impl->announce_buf, 1, MPI_INT64_T, MPI_ANY_SOURCE, 0, impl->inspector, &impl->announce_recv);
  Impl* raw = impl.get();
  impl->coll_thread = std::thread([raw] { raw->CollectiveLoop(); });
  impl->p2p_thread = std::thread([raw] { raw->P2pLoop(); });
  impl->watchdog_thread = std::thread([raw] { raw->WatchdogLoop(); });
  out->reset(new MpiCollective(std::move(impl)));
  return Status::OK();
}

MpiCollective::~MpiCollective() {
  Impl& m = *impl_;
  bool broken = false;
  {
    // Queued collectives still run (the peers expect them); wait until they
    // are done or the watchdog has given up on one.
    std::unique_lock<std::mutex> lock(m.mu);
    m.stop = true;
    m.coll_cv.notify_all();
    m.p2p_cv.notify_all();
    m.done_cv.wait(lock, [&] { return !m.broken.empty() || (m.coll_queue.empty() && m.current == nullptr); });
    broken = !m.broken.empty();
    if (broken && m.current != nullptr) {
      m.left_in_mpi = true;
      g_threads_left_in_mpi.fetch_add(1);
    }
    m.watchdog_cv.notify_all();
  }
  if (m.watchdog_thread.joinable()) m.watchdog_thread.join();
  if (m.p2p_thread.joinable()) m.p2p_thread.join();
  if (broken) {
    // The collective thread may be inside MPI for good, and MPI may still
    // write into the abandoned buffers: leave both (the process is expected
    // to end with Abort()).
    if (m.coll_thread.joinable()) m.coll_thread.detach();
    (void)impl_.release();
    return;
  }
  if (m.coll_thread.joinable()) m.coll_thread.join();
  if (!MpiRuntime::initialized()) return;
  if (m.announce_recv != MPI_REQUEST_NULL) {
    MPI_Cancel(&m.announce_recv);
    MPI_Wait(&m.announce_recv, MPI_STATUS_IGNORE);
  }
  MPI_Comm_free(&m.inspector);
  MPI_Comm_free(&m.p2p_comm);
  MPI_Comm_free(&m.comm);
}

int MpiCollective::rank() const { return impl_->rank; }
int MpiCollective::size() const { return impl_->size; }
int64_t MpiCollective::bytes_sent() const { return impl_->bytes_sent.load(); }
void MpiCollective::Abort(int exit_code) { MpiRuntime::Abort(exit_code); }

std::shared_ptr<Work> MpiCollective::AllReduce(at::Tensor tensor, ReduceOp reduce, OpOptions options) {
  if (Status st = CheckTensor(tensor, "allreduce"); !st.ok()) return Failed(st);
  const bool floating = tensor.is_floating_point();
  if (reduce == ReduceOp::kAverage && !floating) {
    return Failed(Status::InvalidArgument("allreduce: average needs a floating-point tensor"));
  }
  if (options.wire != WireType::kNative && tensor.scalar_type() != at::kFloat &&
      tensor.scalar_type() != at::kDouble) {
    return Failed(Status::InvalidArgument("allreduce: fp16/bf16 wire compression needs a float32/64 tensor"));
  }
  auto op = NewOp(Kind::kAllReduce, options);
  // The buffer MPI reduces: the tensor itself, a host copy, or a 16-bit copy.
  at::Tensor buffer;
  if (options.wire == WireType::kFp16) {
    buffer = tensor.to(at::kCPU, at::kHalf);
  } else if (options.wire == WireType::kBf16) {
    buffer = tensor.to(at::kCPU, at::kBFloat16);
  } else {
    buffer = HostBuffer(tensor, /*copy_contents=*/true);
  }
  // Averages of 16-bit wires are divided before the sum (no overflow), full
  // precision ones after.
  const int world = impl_->size;
  const bool pre_divide = reduce == ReduceOp::kAverage && options.wire != WireType::kNative;
  if (pre_divide) buffer.div_(world);
  if (Status st = Dtype(buffer, &op->dtype); !st.ok()) return Failed(st);
  op->count = static_cast<int>(buffer.numel());
  const at::ScalarType bt = buffer.scalar_type();
  const HalfOps& ops = GetHalfOps();
  if (bt == at::kHalf) {
    op->mpi_op = reduce == ReduceOp::kMax ? ops.max_fp16 : ops.sum_fp16;
  } else if (bt == at::kBFloat16) {
    op->mpi_op = reduce == ReduceOp::kMax ? ops.max_bf16 : ops.sum_bf16;
  } else {
    op->mpi_op = reduce == ReduceOp::kMax ? MPI_MAX : MPI_SUM;
  }
  op->buffer = buffer;
  auto work = impl_->Enqueue(std::move(op));
  const bool same = buffer.is_same(tensor);
  auto* w = static_cast<WorkImpl*>(work.get());
  w->set_finish([tensor, buffer, reduce, world, same, pre_divide]() mutable {
    torch::NoGradGuard no_grad;
    if (!same) tensor.copy_(buffer);
    if (reduce == ReduceOp::kAverage && !pre_divide) tensor.div_(world);
  });
  return work;
}

std::shared_ptr<Work> MpiCollective::Broadcast(at::Tensor tensor, int root, OpOptions options) {
  if (Status st = CheckTensor(tensor, "broadcast"); !st.ok()) return Failed(st);
  if (root < 0 || root >= impl_->size) return Failed(Status::InvalidArgument("broadcast: root out of range"));
  auto op = NewOp(Kind::kBroadcast, options);
  op->root = root;
  at::Tensor buffer = HostBuffer(tensor, /*copy_contents=*/impl_->rank == root);
  op->buffer = buffer;
  op->dtype = MPI_BYTE;
  op->count = static_cast<int>(buffer.numel() * buffer.element_size());
  return CopyBackWhenDone(impl_->Enqueue(std::move(op)), tensor, buffer);
}

std::shared_ptr<Work> MpiCollective::AllGather(at::Tensor output, at::Tensor input, OpOptions options) {
  if (Status st = CheckTensor(input, "allgather input"); !st.ok()) return Failed(st);
  if (Status st = CheckTensor(output, "allgather output"); !st.ok()) return Failed(st);
  if (output.scalar_type() != input.scalar_type() || output.numel() != input.numel() * impl_->size) {
    return Failed(Status::InvalidArgument("allgather: output must have size() x input.numel() elements of the "
                                          "input's dtype"));
  }
  auto op = NewOp(Kind::kAllGather, options);
  op->buffer = HostBuffer(input, true);
  at::Tensor out_buffer = HostBuffer(output, false);
  op->output = out_buffer;
  op->dtype = MPI_BYTE;
  op->count = static_cast<int>(input.numel() * input.element_size());
  return CopyBackWhenDone(impl_->Enqueue(std::move(op)), output, out_buffer);
}

std::shared_ptr<Work> MpiCollective::Barrier(OpOptions options) {
  return impl_->Enqueue(NewOp(Kind::kBarrier, options));
}

namespace {

// The parts of a Send or Recv both share: checks, then the Op.
Status PeerOp(Kind kind, const at::Tensor& tensor, int peer, int tag, const OpOptions& options, int rank, int size,
              std::unique_ptr<Op>* out) {
  const char* what = KindName(kind);
  DTRAIN_RETURN_IF_ERROR(CheckTensor(tensor, what));
  if (peer < 0 || peer >= size || peer == rank) {
    return Status::InvalidArgument(std::string(what) + ": bad " + (kind == Kind::kSend ? "destination" : "source") +
                                   " rank " + std::to_string(peer));
  }
  if (tag < 0) return Status::InvalidArgument(std::string(what) + ": tag must be >= 0");
  auto op = NewOp(kind, options);
  op->peer = peer;
  op->tag = tag;
  op->buffer = HostBuffer(tensor, /*copy_contents=*/kind == Kind::kSend);
  op->dtype = MPI_BYTE;
  op->count = static_cast<int>(tensor.numel() * tensor.element_size());
  *out = std::move(op);
  return Status::OK();
}

}  // namespace

std::shared_ptr<Work> MpiCollective::Send(at::Tensor tensor, int dst, int tag, OpOptions options) {
  std::unique_ptr<Op> op;
  if (Status st = PeerOp(Kind::kSend, tensor, dst, tag, options, impl_->rank, impl_->size, &op); !st.ok()) {
    return Failed(st);
  }
  return impl_->Enqueue(std::move(op));
}

std::shared_ptr<Work> MpiCollective::Recv(at::Tensor tensor, int src, int tag, OpOptions options) {
  std::unique_ptr<Op> op;
  if (Status st = PeerOp(Kind::kRecv, tensor, src, tag, options, impl_->rank, impl_->size, &op); !st.ok()) {
    return Failed(st);
  }
  at::Tensor buffer = op->buffer;
  return CopyBackWhenDone(impl_->Enqueue(std::move(op)), tensor, buffer);
}

}  // namespace dtrain::collective
