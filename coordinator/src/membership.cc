#include "dtrain/coordinator/membership.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "dtrain/common/env.h"
#include "dtrain/common/rpc.h"
#include "dtrain/coordinator.grpc.pb.h"

namespace dtrain::coordinator {

struct MembershipClient::Impl {
  MembershipOptions options;
  std::unique_ptr<dtrain::Coordinator::Stub> stub;
  double interval_s = 2;

  std::mutex mu;
  std::condition_variable cv;
  Progress progress;
  bool stopping = false;
  bool said_goodbye = false;
  bool warned = false;
  std::thread thread;

  void Prepare(grpc::ClientContext* ctx) const {
    rpc::AttachJobToken(ctx, options.token);
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(static_cast<int64_t>(options.rpc_timeout_s * 1000)));
  }

  void Loop() {
    std::unique_lock<std::mutex> lock(mu);
    while (!stopping) {
      cv.wait_for(lock, std::chrono::duration<double>(interval_s), [&] { return stopping; });
      if (stopping) break;
      HeartbeatRequest req;
      req.set_job_id(options.job_id);
      req.set_role(options.role);
      req.set_rank(options.rank);
      *req.mutable_progress() = progress;
      lock.unlock();
      grpc::ClientContext ctx;
      Prepare(&ctx);
      HeartbeatReply reply;
      const grpc::Status st = stub->Heartbeat(&ctx, req, &reply);
      lock.lock();
      if (!st.ok() && !warned) {
        // Once: a coordinator that is gone ends this process through its
        // launcher; until then training goes on.
        warned = true;
        spdlog::warn("heartbeat to the coordinator at {} failed: {}", options.address, st.error_message());
      } else if (st.ok()) {
        warned = false;
      }
    }
  }
};

MembershipClient::MembershipClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

MembershipClient::~MembershipClient() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
}

Status MembershipClient::FromEnvironment(ProcessRole role, int rank, std::unique_ptr<MembershipClient>* client) {
  client->reset();
  const char* address = env::Get(env::kCoordinator, nullptr);
  if (address == nullptr) return Status::OK();
  MembershipOptions o;
  o.address = address;
  o.job_id = env::Get(env::kJobId, "");
  o.role = role;
  o.rank = rank;
  DTRAIN_RETURN_IF_ERROR(rpc::LoadJobToken("", &o.token));
  if (o.job_id.empty()) {
    return Status::InvalidArgument(std::string(env::kCoordinator) + " is set but " + env::kJobId + " is not");
  }
  return Connect(o, client);
}

Status MembershipClient::Connect(const MembershipOptions& options, std::unique_ptr<MembershipClient>* client) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->stub = dtrain::Coordinator::NewStub(grpc::CreateChannel(options.address, grpc::InsecureChannelCredentials()));
  RegisterRequest req;
  req.set_job_id(options.job_id);
  req.set_role(options.role);
  req.set_rank(options.rank);
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  req.set_host(host);
  req.set_pid(static_cast<int32_t>(getpid()));
  RegisterReply reply;
  grpc::ClientContext ctx;
  impl->Prepare(&ctx);
  ctx.set_wait_for_ready(true);  // the coordinator may still be starting its server
  DTRAIN_RETURN_IF_ERROR(
      rpc::FromGrpc(impl->stub->Register(&ctx, req, &reply), "Coordinator.Register to " + options.address));
  if (reply.heartbeat_interval_s() > 0) impl->interval_s = reply.heartbeat_interval_s();
  impl->progress.set_phase("starting");
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->Loop(); });
  client->reset(new MembershipClient(std::move(impl)));
  return Status::OK();
}

void MembershipClient::SetProgress(const Progress& progress) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->progress = progress;
}

void MembershipClient::SetPhase(const std::string& phase) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->progress.set_phase(phase);
}

void MembershipClient::Goodbye(const Status& outcome) {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->said_goodbye) return;
    impl_->said_goodbye = true;
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
  // The final progress first (the last heartbeat may predate it).
  {
    HeartbeatRequest hb;
    hb.set_job_id(impl_->options.job_id);
    hb.set_role(impl_->options.role);
    hb.set_rank(impl_->options.rank);
    {
      std::lock_guard<std::mutex> lock(impl_->mu);
      *hb.mutable_progress() = impl_->progress;
    }
    HeartbeatReply hr;
    grpc::ClientContext ctx;
    impl_->Prepare(&ctx);
    (void)impl_->stub->Heartbeat(&ctx, hb, &hr);
  }
  GoodbyeRequest req;
  req.set_job_id(impl_->options.job_id);
  req.set_role(impl_->options.role);
  req.set_rank(impl_->options.rank);
  req.set_ok(outcome.ok());
  req.set_code(static_cast<int32_t>(outcome.code()));
  if (!outcome.ok()) req.set_message(outcome.ToString());
  GoodbyeReply reply;
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx);
  const grpc::Status st = impl_->stub->Goodbye(&ctx, req, &reply);
  if (!st.ok()) spdlog::warn("goodbye to the coordinator at {} failed: {}", impl_->options.address, st.error_message());
}

}  // namespace dtrain::coordinator
