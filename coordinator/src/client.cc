#include "dtrain/coordinator/client.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include <chrono>

#include "dtrain/common/rpc.h"
#include "dtrain/coordinator.grpc.pb.h"

namespace dtrain::coordinator {

struct CoordinatorClient::Impl {
  std::string address;
  std::string token;
  std::unique_ptr<dtrain::Coordinator::Stub> stub;

  template <typename Call>
  Status Invoke(const char* name, double timeout_s, Call&& call) {
    grpc::ClientContext ctx;
    rpc::AttachJobToken(&ctx, token);
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
    const grpc::Status st = call(&ctx);
    if (st.error_code() == grpc::StatusCode::UNAVAILABLE ||
        (st.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED && timeout_s <= 10)) {
      return Status::Unavailable("cannot reach the coordinator at " + address + " (" + st.error_message() +
                                 "); is dtrain-coordinator running there?");
    }
    return rpc::FromGrpc(st, std::string("Coordinator.") + name + " to " + address);
  }
};

CoordinatorClient::CoordinatorClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CoordinatorClient::~CoordinatorClient() = default;

std::unique_ptr<CoordinatorClient> CoordinatorClient::Create(const std::string& address, const std::string& token) {
  auto impl = std::make_unique<Impl>();
  impl->address = address;
  impl->token = token;
  impl->stub = dtrain::Coordinator::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  return std::unique_ptr<CoordinatorClient>(new CoordinatorClient(std::move(impl)));
}

Status CoordinatorClient::Submit(const SubmitRequest& request, SubmitReply* reply) {
  return impl_->Invoke("Submit", 10, [&](grpc::ClientContext* c) { return impl_->stub->Submit(c, request, reply); });
}

Status CoordinatorClient::Jobs(const std::string& id, std::vector<JobRecord>* jobs) {
  StatusRequest req;
  req.set_job_id(id);
  StatusReply reply;
  DTRAIN_RETURN_IF_ERROR(
      impl_->Invoke("ListJobs", 10, [&](grpc::ClientContext* c) { return impl_->stub->ListJobs(c, req, &reply); }));
  jobs->assign(reply.jobs().begin(), reply.jobs().end());
  return Status::OK();
}

Status CoordinatorClient::Stop(const std::string& id, JobState* state) {
  StopRequest req;
  req.set_job_id(id);
  StopReply reply;
  DTRAIN_RETURN_IF_ERROR(
      impl_->Invoke("StopJob", 60, [&](grpc::ClientContext* c) { return impl_->stub->StopJob(c, req, &reply); }));
  *state = reply.state();
  return Status::OK();
}

Status CoordinatorClient::ReadLog(const LogsRequest& request, LogsReply* reply) {
  return impl_->Invoke("ReadLog", 10, [&](grpc::ClientContext* c) { return impl_->stub->ReadLog(c, request, reply); });
}

}  // namespace dtrain::coordinator
