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

// MPI runs at MPI_THREAD_SERIALIZED: the communication threads of several
// MpiCollectives (and Create/destroy on the caller's thread) take turns
// through this mutex.
std::mutex& MpiCallMutex() {
  static std::mutex mu;
  return mu;
}

// ---- Work ------------------------------------------------------------------------

class WorkImpl : public Work {
 public:
  Status Wait() override {
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
    }
    cv_.notify_all();
  }
  // Runs on the waiting thread after a successful completion (copy back,
  // decompress, divide).
  void set_finish(std::function<void()> f) { finish_ = std::move(f); }
  void set_label(std::string label) { label_ = std::move(label); }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
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
  // Comm thread only:
  MPI_Request request = MPI_REQUEST_NULL;
  Clock::time_point start;
  bool announced = false;
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
  int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided);
  if (rc != MPI_SUCCESS) return Status::Internal("MPI_Init_thread failed: " + MpiError(rc));
  if (provided < MPI_THREAD_SERIALIZED) {
    return Status::FailedPrecondition("this MPI library does not provide MPI_THREAD_SERIALIZED (got level " +
                                      std::to_string(provided) + ")");
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
  std::condition_variable cv;
  std::deque<std::unique_ptr<Op>> queue;  // GUARDED_BY(mu)
  bool stop = false;                      // GUARDED_BY(mu)
  int64_t next_seq = 0;                   // GUARDED_BY(mu)
  std::string broken;                     // GUARDED_BY(mu); why, once broken
  std::thread thread;

  // Comm thread only.
  std::list<std::unique_ptr<Op>> in_flight;
  // Operations given up after a timeout: MPI may still write into their
  // buffers, so they are kept alive (never freed) once the collective broke.
  std::list<std::unique_ptr<Op>> abandoned;
  std::vector<int64_t> peer_waiting;  // latest collective seq each rank announced waiting in (-1: none)
  int64_t announce_buf = -1;
  std::vector<int64_t> announce_out;
  std::vector<MPI_Request> announce_requests;
  MPI_Request announce_recv = MPI_REQUEST_NULL;

  std::shared_ptr<Work> Enqueue(std::unique_ptr<Op> op);
  void Loop();
  void Start(Op& op);
  void FailAll(const std::string& why);
  void Announce(const Op& op);
  void PollAnnouncements();
  std::string StallReport(const Op& op) const;
};

std::shared_ptr<Work> MpiCollective::Impl::Enqueue(std::unique_ptr<Op> op) {
  auto work = std::make_shared<WorkImpl>();
  op->work = work;
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
    if (IsCollective(op->kind)) op->seq = next_seq++;
    queue.push_back(std::move(op));
  }
  cv.notify_one();
  return work;
}

void MpiCollective::Impl::Start(Op& op) {
  op.start = Clock::now();
  int rc = MPI_SUCCESS;
  void* buf = op.buffer.defined() ? op.buffer.data_ptr() : nullptr;
  switch (op.kind) {
    case Kind::kAllReduce:
      rc = MPI_Iallreduce(MPI_IN_PLACE, buf, op.count, op.dtype, op.mpi_op, comm, &op.request);
      break;
    case Kind::kBroadcast:
      rc = MPI_Ibcast(buf, op.count, op.dtype, op.root, comm, &op.request);
      break;
    case Kind::kAllGather:
      rc = MPI_Iallgather(buf, op.count, op.dtype, op.output.data_ptr(), op.count, op.dtype, comm, &op.request);
      break;
    case Kind::kBarrier:
      rc = MPI_Ibarrier(comm, &op.request);
      break;
    case Kind::kSend:
      rc = MPI_Isend(buf, op.count, op.dtype, op.peer, op.tag, p2p_comm, &op.request);
      break;
    case Kind::kRecv:
      rc = MPI_Irecv(buf, op.count, op.dtype, op.peer, op.tag, p2p_comm, &op.request);
      break;
  }
  if (rc != MPI_SUCCESS) {
    op.request = MPI_REQUEST_NULL;
    op.work->Complete(Status::Internal(std::string(KindName(op.kind)) + " '" + op.label + "': " + MpiError(rc)), 0);
    return;
  }
  if (op.kind != Kind::kRecv && op.kind != Kind::kBarrier) {
    int type_size = 1;
    MPI_Type_size(op.dtype, &type_size);
    bytes_sent += static_cast<int64_t>(op.count) * type_size;
  }
}

void MpiCollective::Impl::Announce(const Op& op) {
  // Tell every peer "rank `rank` is waiting in collective #seq".
  announce_out.assign(static_cast<size_t>(size), op.seq);
  for (int r = 0; r < size; ++r) {
    if (r == rank) continue;
    MPI_Request req;
    if (MPI_Isend(&announce_out[static_cast<size_t>(r)], 1, MPI_INT64_T, r, 0, inspector, &req) == MPI_SUCCESS) {
      announce_requests.push_back(req);
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

void MpiCollective::Impl::FailAll(const std::string& why) {
  std::deque<std::unique_ptr<Op>> queued;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (broken.empty()) broken = why;
    queued.swap(queue);
  }
  const Status st = Status::Aborted("this collective is broken (" + why + ")");
  for (auto& op : in_flight) op->work->Complete(st, 0);
  for (auto& op : queued) op->work->Complete(st, 0);
  // The requests cannot be cancelled portably; they are abandoned (the
  // process is expected to Abort()), their buffers kept alive.
  abandoned.splice(abandoned.end(), in_flight);
}

void MpiCollective::Impl::Loop() {
  auto last_progress = Clock::now();
  int sleep_us = 10;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu);
      if (in_flight.empty()) {
        cv.wait(lock, [this] { return stop || !queue.empty(); });
        if (stop && queue.empty()) break;
      }
      while (!queue.empty()) {
        in_flight.push_back(std::move(queue.front()));
        queue.pop_front();
        in_flight.back()->start = Clock::time_point{};
      }
    }
    bool progress = false;
    std::unique_lock<std::mutex> mpi_lock(MpiCallMutex());
    for (auto& op : in_flight) {
      if (op->start == Clock::time_point{}) {
        Start(*op);
        progress = true;
      }
    }
    for (auto it = in_flight.begin(); it != in_flight.end();) {
      Op& op = **it;
      if (op.work->IsCompleted()) {  // failed to start
        it = in_flight.erase(it);
        continue;
      }
      int flag = 0;
      const int rc = MPI_Test(&op.request, &flag, MPI_STATUS_IGNORE);
      const auto now = Clock::now();
      const double secs = std::chrono::duration<double>(now - op.start).count();
      if (rc != MPI_SUCCESS) {
        op.work->Complete(Status::Internal(std::string(KindName(op.kind)) + " '" + op.label + "': " + MpiError(rc)),
                          secs);
        it = in_flight.erase(it);
        progress = true;
        continue;
      }
      if (flag) {
        op.work->Complete(Status::OK(), secs);
        it = in_flight.erase(it);
        progress = true;
        continue;
      }
      if (IsCollective(op.kind) && !op.announced && size > 1 &&
          now - op.start > std::chrono::duration<double>(op.timeout) * options.stall_fraction) {
        op.announced = true;
        Announce(op);
      }
      ++it;
    }
    PollAnnouncements();
    // Deadlines, checked after the announcements arrived.
    const auto now = Clock::now();
    for (auto& op : in_flight) {
      if (now - op->start > op->timeout) {
        const std::string report = StallReport(*op);
        spdlog::error("collective timeout: {}", report);
        op->work->Complete(Status::DeadlineExceeded(report), std::chrono::duration<double>(now - op->start).count());
        FailAll("timed out: " + report);
        break;
      }
    }
    mpi_lock.unlock();
    if (progress) {
      last_progress = now;
      sleep_us = 10;
    } else if (!in_flight.empty() && now - last_progress > std::chrono::microseconds(options.spin_us)) {
      std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
      sleep_us = std::min(sleep_us * 2, std::max(options.max_sleep_us, 1));
    }
  }
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
  std::unique_lock<std::mutex> mpi_lock(MpiCallMutex());
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
  mpi_lock.unlock();
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->Loop(); });
  out->reset(new MpiCollective(std::move(impl)));
  return Status::OK();
}

MpiCollective::~MpiCollective() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stop = true;
  }
  impl_->cv.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
  bool broken = false;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    broken = !impl_->broken.empty();
  }
  if (!MpiRuntime::initialized() || broken) {
    // Peers' state unknown: MPI may still use the abandoned buffers.
    (void)impl_.release();
    return;
  }
  std::lock_guard<std::mutex> mpi_lock(MpiCallMutex());
  if (impl_->announce_recv != MPI_REQUEST_NULL) {
    MPI_Cancel(&impl_->announce_recv);
    MPI_Wait(&impl_->announce_recv, MPI_STATUS_IGNORE);
  }
  for (MPI_Request& r : impl_->announce_requests) {
    if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
  }
  MPI_Comm_free(&impl_->inspector);
  MPI_Comm_free(&impl_->p2p_comm);
  MPI_Comm_free(&impl_->comm);
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
  auto op = std::make_unique<Op>();
  op->kind = Kind::kAllReduce;
  op->label = options.label;
  op->timeout = options.timeout;
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
  auto op = std::make_unique<Op>();
  op->kind = Kind::kBroadcast;
  op->label = options.label;
  op->timeout = options.timeout;
  op->root = root;
  at::Tensor buffer = HostBuffer(tensor, /*copy_contents=*/impl_->rank == root);
  op->buffer = buffer;
  op->dtype = MPI_BYTE;
  op->count = static_cast<int>(buffer.numel() * buffer.element_size());
  auto work = impl_->Enqueue(std::move(op));
  if (!buffer.is_same(tensor)) {
    static_cast<WorkImpl*>(work.get())->set_finish([tensor, buffer]() mutable {
      torch::NoGradGuard no_grad;
      tensor.copy_(buffer);
    });
  }
  return work;
}

std::shared_ptr<Work> MpiCollective::AllGather(at::Tensor output, at::Tensor input, OpOptions options) {
  if (Status st = CheckTensor(input, "allgather input"); !st.ok()) return Failed(st);
  if (Status st = CheckTensor(output, "allgather output"); !st.ok()) return Failed(st);
  if (output.scalar_type() != input.scalar_type() || output.numel() != input.numel() * impl_->size) {
    return Failed(Status::InvalidArgument("allgather: output must have size() x input.numel() elements of the "
                                          "input's dtype"));
  }
  auto op = std::make_unique<Op>();
  op->kind = Kind::kAllGather;
  op->label = options.label;
  op->timeout = options.timeout;
  op->buffer = HostBuffer(input, true);
  at::Tensor out_buffer = HostBuffer(output, false);
  op->output = out_buffer;
  op->dtype = MPI_BYTE;
  op->count = static_cast<int>(input.numel() * input.element_size());
  auto work = impl_->Enqueue(std::move(op));
  if (!out_buffer.is_same(output)) {
    static_cast<WorkImpl*>(work.get())->set_finish([output, out_buffer]() mutable {
      torch::NoGradGuard no_grad;
      output.copy_(out_buffer);
    });
  }
  return work;
}

std::shared_ptr<Work> MpiCollective::Barrier(OpOptions options) {
  auto op = std::make_unique<Op>();
  op->kind = Kind::kBarrier;
  op->label = options.label;
  op->timeout = options.timeout;
  return impl_->Enqueue(std::move(op));
}

std::shared_ptr<Work> MpiCollective::Send(at::Tensor tensor, int dst, int tag, OpOptions options) {
  if (Status st = CheckTensor(tensor, "send"); !st.ok()) return Failed(st);
  if (dst < 0 || dst >= impl_->size || dst == impl_->rank) {
    return Failed(Status::InvalidArgument("send: bad destination rank " + std::to_string(dst)));
  }
  if (tag < 0) return Failed(Status::InvalidArgument("send: tag must be >= 0"));
  auto op = std::make_unique<Op>();
  op->kind = Kind::kSend;
  op->label = options.label;
  op->timeout = options.timeout;
  op->peer = dst;
  op->tag = tag;
  op->buffer = HostBuffer(tensor, true);
  op->dtype = MPI_BYTE;
  op->count = static_cast<int>(tensor.numel() * tensor.element_size());
  return impl_->Enqueue(std::move(op));
}

std::shared_ptr<Work> MpiCollective::Recv(at::Tensor tensor, int src, int tag, OpOptions options) {
  if (Status st = CheckTensor(tensor, "recv"); !st.ok()) return Failed(st);
  if (src < 0 || src >= impl_->size || src == impl_->rank) {
    return Failed(Status::InvalidArgument("recv: bad source rank " + std::to_string(src)));
  }
  if (tag < 0) return Failed(Status::InvalidArgument("recv: tag must be >= 0"));
  auto op = std::make_unique<Op>();
  op->kind = Kind::kRecv;
  op->label = options.label;
  op->timeout = options.timeout;
  op->peer = src;
  op->tag = tag;
  at::Tensor buffer = HostBuffer(tensor, false);
  op->buffer = buffer;
  op->dtype = MPI_BYTE;
  op->count = static_cast<int>(tensor.numel() * tensor.element_size());
  auto work = impl_->Enqueue(std::move(op));
  if (!buffer.is_same(tensor)) {
    static_cast<WorkImpl*>(work.get())->set_finish([tensor, buffer]() mutable {
      torch::NoGradGuard no_grad;
      tensor.copy_(buffer);
    });
  }
  return work;
}

}  // namespace dtrain::collective
