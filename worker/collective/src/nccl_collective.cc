#include "dtrain/worker/collective/nccl_collective.h"

#include <torch/torch.h>

#ifdef DTRAIN_HAVE_NCCL
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <nccl.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>

#include "dtrain/worker/collective/mpi_collective.h"
#endif

namespace dtrain::collective {

#ifndef DTRAIN_HAVE_NCCL

bool NcclAvailable() { return false; }

Status CreateNcclCollective(Collective& bootstrap, const NcclCollectiveOptions& options,
                            std::unique_ptr<Collective>* out) {
  return Status::FailedPrecondition(
      "this build of dtrain has no NCCL backend (CMake found no CUDA LibTorch or no NCCL; see "
      "docs/dependencies.md); use parallelism.sync.backend: BACKEND_MPI");
}

#else  // DTRAIN_HAVE_NCCL

namespace {

using Clock = std::chrono::steady_clock;

Status NcclStatus(ncclResult_t r, const std::string& what) {
  if (r == ncclSuccess) return Status::OK();
  return Status::Internal(what + ": " + ncclGetErrorString(r));
}

Status NcclType(const at::Tensor& t, ncclDataType_t* out) {
  switch (t.scalar_type()) {
    case at::kFloat: *out = ncclFloat32; return Status::OK();
    case at::kDouble: *out = ncclFloat64; return Status::OK();
    case at::kHalf: *out = ncclFloat16; return Status::OK();
    case at::kBFloat16: *out = ncclBfloat16; return Status::OK();
    case at::kInt: *out = ncclInt32; return Status::OK();
    case at::kLong: *out = ncclInt64; return Status::OK();
    case at::kByte: *out = ncclUint8; return Status::OK();
    default:
      return Status::InvalidArgument(std::string("NCCL collective: unsupported dtype ") +
                                     std::string(c10::toString(t.scalar_type())));
  }
}

Status CheckCuda(const at::Tensor& t, const char* what, int device) {
  if (!t.defined()) return Status::InvalidArgument(std::string(what) + ": undefined tensor");
  if (!t.is_cuda()) return Status::InvalidArgument(std::string(what) + ": the NCCL backend needs CUDA tensors");
  if (t.get_device() != device) {
    return Status::InvalidArgument(std::string(what) + ": tensor on cuda:" + std::to_string(t.get_device()) +
                                   ", this rank's communicator is on cuda:" + std::to_string(device));
  }
  if (!t.is_contiguous()) return Status::InvalidArgument(std::string(what) + ": tensor must be contiguous");
  return Status::OK();
}

class NcclCollective;

// A launched NCCL operation: an event recorded on the communication stream
// after it. Wait() polls the event (and the communicator's async error) up to
// the deadline, then makes the caller's current stream wait for it.
class NcclWork : public Work {
 public:
  NcclWork(NcclCollective* owner, std::string label, std::chrono::milliseconds timeout, int device)
      : owner_(owner), label_(std::move(label)), timeout_(timeout), device_(device), start_(Clock::now()) {}

  Status Wait() override;
  bool IsCompleted() override;
  double seconds() const override { return seconds_.load(); }

  Status status_at_launch;  // set when the launch itself failed
  at::cuda::CUDAEvent done{cudaEventDisableTiming};
  std::vector<at::Tensor> keep_alive;
  std::function<void()> finish;  // on the caller's stream, after the wait

 private:
  NcclCollective* owner_;
  std::string label_;
  std::chrono::milliseconds timeout_;
  int device_;
  Clock::time_point start_;
  std::mutex mu_;
  bool waited_ = false;
  Status result_;
  std::atomic<double> seconds_{0};
};

class NcclCollective : public Collective {
 public:
  NcclCollective(ncclComm_t comm, int rank, int size, const NcclCollectiveOptions& options)
      : comm_(comm),
        rank_(rank),
        size_(size),
        options_(options),
        stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, static_cast<c10::DeviceIndex>(options.device_index))) {}
  ~NcclCollective() override {
    if (broken_.load()) {
      ncclCommAbort(comm_);
    } else {
      ncclCommDestroy(comm_);
    }
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "nccl"; }

  std::shared_ptr<Work> AllReduce(at::Tensor tensor, ReduceOp op, OpOptions options) override {
    if (Status st = CheckCuda(tensor, "allreduce", options_.device_index); !st.ok()) return Failed(st, options);
    at::Tensor buffer = tensor;
    if (options.wire != WireType::kNative) {
      if (tensor.scalar_type() != at::kFloat && tensor.scalar_type() != at::kDouble) {
        return Failed(Status::InvalidArgument("allreduce: fp16/bf16 wire compression needs a float32/64 tensor"),
                      options);
      }
      buffer = tensor.to(options.wire == WireType::kFp16 ? at::kHalf : at::kBFloat16);
    }
    ncclDataType_t dtype = ncclFloat32;
    if (Status st = NcclType(buffer, &dtype); !st.ok()) return Failed(st, options);
    const ncclRedOp_t red = op == ReduceOp::kSum ? ncclSum : op == ReduceOp::kMax ? ncclMax : ncclAvg;
    auto work = Launch("allreduce", options, {buffer}, [&] {
      return ncclAllReduce(buffer.data_ptr(), buffer.data_ptr(), static_cast<size_t>(buffer.numel()), dtype, red,
                           comm_, stream_.stream());
    });
    if (!buffer.is_same(tensor)) {
      work->finish = [tensor, buffer]() mutable {
        torch::NoGradGuard no_grad;
        tensor.copy_(buffer);
      };
    }
    return work;
  }

  std::shared_ptr<Work> Broadcast(at::Tensor tensor, int root, OpOptions options) override {
    if (Status st = CheckCuda(tensor, "broadcast", options_.device_index); !st.ok()) return Failed(st, options);
    if (root < 0 || root >= size_) return Failed(Status::InvalidArgument("broadcast: root out of range"), options);
    return Launch("broadcast", options, {tensor}, [&] {
      return ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(),
                           static_cast<size_t>(tensor.numel() * tensor.element_size()), ncclUint8, root, comm_,
                           stream_.stream());
    });
  }

  std::shared_ptr<Work> AllGather(at::Tensor output, at::Tensor input, OpOptions options) override {
    if (Status st = CheckCuda(input, "allgather input", options_.device_index); !st.ok()) return Failed(st, options);
    if (Status st = CheckCuda(output, "allgather output", options_.device_index); !st.ok()) {
      return Failed(st, options);
    }
    if (output.scalar_type() != input.scalar_type() || output.numel() != input.numel() * size_) {
      return Failed(Status::InvalidArgument(
                        "allgather: output must have size() x input.numel() elements of the input's dtype"),
                    options);
    }
    return Launch("allgather", options, {input, output}, [&] {
      return ncclAllGather(input.data_ptr(), output.data_ptr(),
                           static_cast<size_t>(input.numel() * input.element_size()), ncclUint8, comm_,
                           stream_.stream());
    });
  }

  std::shared_ptr<Work> Barrier(OpOptions options) override {
    at::Tensor one = at::ones({1}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, options_.device_index));
    return Launch("barrier", options, {one}, [&] {
      return ncclAllReduce(one.data_ptr(), one.data_ptr(), 1, ncclFloat32, ncclSum, comm_, stream_.stream());
    });
  }

  // NCCL has no tags: sends and receives between a pair of ranks match in
  // issue order (the pipeline issues them in the same order on both sides).
  std::shared_ptr<Work> Send(at::Tensor tensor, int dst, int tag, OpOptions options) override {
    if (Status st = CheckCuda(tensor, "send", options_.device_index); !st.ok()) return Failed(st, options);
    if (dst < 0 || dst >= size_ || dst == rank_) {
      return Failed(Status::InvalidArgument("send: bad destination rank " + std::to_string(dst)), options);
    }
    return Launch("send", options, {tensor}, [&] {
      return ncclSend(tensor.data_ptr(), static_cast<size_t>(tensor.numel() * tensor.element_size()), ncclUint8, dst,
                      comm_, stream_.stream());
    });
  }

  std::shared_ptr<Work> Recv(at::Tensor tensor, int src, int tag, OpOptions options) override {
    if (Status st = CheckCuda(tensor, "recv", options_.device_index); !st.ok()) return Failed(st, options);
    if (src < 0 || src >= size_ || src == rank_) {
      return Failed(Status::InvalidArgument("recv: bad source rank " + std::to_string(src)), options);
    }
    return Launch("recv", options, {tensor}, [&] {
      return ncclRecv(tensor.data_ptr(), static_cast<size_t>(tensor.numel() * tensor.element_size()), ncclUint8, src,
                      comm_, stream_.stream());
    });
  }

  [[noreturn]] void Abort(int exit_code) override {
    broken_ = true;
    ncclCommAbort(comm_);
    MpiRuntime::Abort(exit_code);
  }

  // Called by NcclWork when its deadline passes.
  void MarkBroken(const std::string& why) {
    bool expected = false;
    if (broken_.compare_exchange_strong(expected, true)) {
      spdlog::error("NCCL collective timeout: {}", why);
      ncclCommAbort(comm_);
      std::lock_guard<std::mutex> lock(mu_);
      why_broken_ = why;
    }
  }
  Status AsyncError() {
    ncclResult_t async = ncclSuccess;
    ncclCommGetAsyncError(comm_, &async);
    return NcclStatus(async, "NCCL asynchronous error");
  }
  int rank_for_messages() const { return rank_; }

 private:
  std::shared_ptr<NcclWork> Failed(Status st, const OpOptions& options) {
    auto w = std::make_shared<NcclWork>(this, options.label, options.timeout, options_.device_index);
    w->status_at_launch = std::move(st);
    return w;
  }

  template <typename F>
  std::shared_ptr<NcclWork> Launch(const char* kind, const OpOptions& options, std::vector<at::Tensor> tensors,
                                   F&& call) {
    const std::string label = std::string(kind) + " '" + (options.label.empty() ? kind : options.label) + "'";
    const auto timeout = options.timeout.count() > 0 ? options.timeout : options_.timeout;
    auto work = std::make_shared<NcclWork>(this, label, timeout, options_.device_index);
    if (broken_.load()) {
      std::lock_guard<std::mutex> lock(mu_);
      work->status_at_launch = Status::Aborted(label + " not started: this collective is broken (" + why_broken_ + ")");
      return work;
    }
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(options_.device_index));
    // The communication stream waits for the work already queued on the
    // caller's stream (which produced the inputs).
    at::cuda::CUDAEvent ready(cudaEventDisableTiming);
    ready.record(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(options_.device_index)));
    ready.block(stream_);
    for (const at::Tensor& t : tensors) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream_);
    Status st = NcclStatus(call(), label);
    if (!st.ok()) {
      work->status_at_launch = st;
      return work;
    }
    work->done.record(stream_);
    work->keep_alive = std::move(tensors);
    return work;
  }

  ncclComm_t comm_;
  int rank_;
  int size_;
  NcclCollectiveOptions options_;
  c10::cuda::CUDAStream stream_;
  std::atomic<bool> broken_{false};
  std::mutex mu_;
  std::string why_broken_;  // GUARDED_BY(mu_)
};

bool NcclWork::IsCompleted() {
  if (!status_at_launch.ok()) return true;
  return done.query();
}

Status NcclWork::Wait() {
  std::lock_guard<std::mutex> lock(mu_);
  if (waited_) return result_;
  waited_ = true;
  if (!status_at_launch.ok()) {
    result_ = status_at_launch;
    return result_;
  }
  int sleep_us = 1;
  while (!done.query()) {
    if (Status st = owner_->AsyncError(); !st.ok()) {
      result_ = st.WithContext(label_);
      owner_->MarkBroken(result_.message());
      return result_;
    }
    if (Clock::now() - start_ > timeout_) {
      result_ = Status::DeadlineExceeded(
          label_ + " did not complete within " + std::to_string(timeout_.count() / 1000.0) + " s on rank " +
          std::to_string(owner_->rank_for_messages()) +
          " (NCCL cannot tell which ranks had not arrived; the other ranks' logs show where they were)");
      owner_->MarkBroken(result_.message());
      return result_;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
    sleep_us = std::min(sleep_us * 2, 200);
  }
  seconds_ = std::chrono::duration<double>(Clock::now() - start_).count();
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  done.block(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)));
  if (finish) {
    try {
      finish();
    } catch (const std::exception& e) {
      result_ = Status::Internal(label_ + ": " + e.what());
    }
  }
  return result_;
}

}  // namespace

bool NcclAvailable() { return true; }

Status CreateNcclCollective(Collective& bootstrap, const NcclCollectiveOptions& options,
                            std::unique_ptr<Collective>* out) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    return Status::FailedPrecondition("the NCCL backend needs a CUDA GPU and this machine has none");
  }
  if (options.device_index < 0 || options.device_index >= devices) {
    return Status::InvalidArgument("NCCL: device " + std::to_string(options.device_index) + " out of range (" +
                                   std::to_string(devices) + " GPU(s))");
  }
  // 1. Rank 0 makes the unique id; 2. the bootstrap broadcasts it; 3. every
  // rank joins the communicator on its device.
  ncclUniqueId id;
  std::memset(&id, 0, sizeof id);
  if (bootstrap.rank() == 0) DTRAIN_RETURN_IF_ERROR(NcclStatus(ncclGetUniqueId(&id), "ncclGetUniqueId"));
  at::Tensor id_bytes = at::empty({static_cast<int64_t>(sizeof id)}, at::kByte);
  std::memcpy(id_bytes.data_ptr(), &id, sizeof id);
  OpOptions bo;
  bo.label = "NCCL unique id";
  DTRAIN_RETURN_IF_ERROR(bootstrap.Broadcast(id_bytes, 0, bo)->Wait());
  std::memcpy(&id, id_bytes.data_ptr(), sizeof id);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(options.device_index));
  ncclComm_t comm = nullptr;
  DTRAIN_RETURN_IF_ERROR(NcclStatus(ncclCommInitRank(&comm, bootstrap.size(), id, bootstrap.rank()),
                                    "ncclCommInitRank"));
  out->reset(new NcclCollective(comm, bootstrap.rank(), bootstrap.size(), options));
  return Status::OK();
}

#endif  // DTRAIN_HAVE_NCCL

}  // namespace dtrain::collective
