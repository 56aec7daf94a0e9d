#include "dtrain/common/rpc.h"

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>

#include "dtrain/common/env.h"

namespace dtrain::rpc {

namespace {

// Constant-time in the position of the first difference.
bool SameToken(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

}  // namespace

grpc::Status CheckJobToken(const grpc::ServerContext& context, const std::string& expected) {
  const auto& md = context.client_metadata();
  auto it = md.find(kTokenMetadataKey);
  if (it == md.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        std::string("missing job token (metadata '") + kTokenMetadataKey + "')");
  }
  const std::string got(it->second.data(), it->second.size());
  if (expected.empty() || !SameToken(got, expected)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "wrong job token");
  }
  return grpc::Status::OK;
}

void AttachJobToken(grpc::ClientContext* context, const std::string& token) {
  context->AddMetadata(kTokenMetadataKey, token);
}

Status LoadJobToken(const std::string& token_file, std::string* token) {
  const char* from_env = env::Get(env::kJobToken, "");
  if (from_env[0] != '\0') {
    *token = from_env;
    return Status::OK();
  }
  if (!token_file.empty()) {
    std::ifstream in(token_file);
    if (!in) return Status::NotFound("cannot read the token file " + token_file);
    std::string line;
    std::getline(in, line);
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
    if (line.empty()) return Status::InvalidArgument("the token file " + token_file + " is empty");
    *token = line;
    return Status::OK();
  }
  return Status::NotFound(std::string("no job token: set ") + env::kJobToken + " or pass --token-file FILE");
}

std::string NewJobToken() {
  std::random_device rd;
  std::string out;
  char buf[9];
  for (int i = 0; i < 4; ++i) {
    std::snprintf(buf, sizeof buf, "%08x", static_cast<unsigned>(rd()));
    out += buf;
  }
  return out;
}

Status StartServer(const ServerSetup& setup, grpc::Service* service, std::unique_ptr<grpc::Server>* server,
                   int* port) {
  grpc::ServerBuilder b;
  const std::string addr = setup.bind_address + ":" + std::to_string(setup.port);
  *port = 0;
  b.AddListeningPort(addr, grpc::InsecureServerCredentials(), port);
  b.RegisterService(service);
  b.SetMaxReceiveMessageSize(setup.max_message_bytes);
  b.SetMaxSendMessageSize(setup.max_message_bytes);
  for (const auto& [key, value] : setup.int_args) b.AddChannelArgument(key, value);
  if (setup.max_pollers > 0) {
    b.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MIN_POLLERS, 1);
    b.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS, setup.max_pollers);
  }
  *server = b.BuildAndStart();
  if (!*server || *port == 0) {
    server->reset();
    return Status::Unavailable("cannot listen on " + addr + " (address in use, or not an address of this machine?)");
  }
  return Status::OK();
}

void StopServer(std::unique_ptr<grpc::Server>* server) {
  if (!*server) return;
  (*server)->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  server->reset();
}

grpc::Status ToGrpc(const Status& status) {
  using C = Status::Code;
  grpc::StatusCode code = grpc::StatusCode::UNKNOWN;
  switch (status.code()) {
    case C::kOk: return grpc::Status::OK;
    case C::kInvalidArgument: code = grpc::StatusCode::INVALID_ARGUMENT; break;
    case C::kNotFound: code = grpc::StatusCode::NOT_FOUND; break;
    case C::kCorruption: code = grpc::StatusCode::DATA_LOSS; break;
    case C::kIOError: code = grpc::StatusCode::INTERNAL; break;
    case C::kFailedPrecondition: code = grpc::StatusCode::FAILED_PRECONDITION; break;
    case C::kOutOfRange: code = grpc::StatusCode::OUT_OF_RANGE; break;
    case C::kAlreadyExists: code = grpc::StatusCode::ALREADY_EXISTS; break;
    case C::kUnauthenticated: code = grpc::StatusCode::UNAUTHENTICATED; break;
    case C::kDeadlineExceeded: code = grpc::StatusCode::DEADLINE_EXCEEDED; break;
    case C::kAborted: code = grpc::StatusCode::ABORTED; break;
    case C::kUnavailable: code = grpc::StatusCode::UNAVAILABLE; break;
    case C::kInternal: code = grpc::StatusCode::INTERNAL; break;
  }
  return grpc::Status(code, status.message());
}

Status FromGrpc(const grpc::Status& status, const std::string& what) {
  if (status.ok()) return Status::OK();
  const std::string msg = what + ": " + status.error_message();
  switch (status.error_code()) {
    case grpc::StatusCode::INVALID_ARGUMENT: return Status::InvalidArgument(msg);
    case grpc::StatusCode::NOT_FOUND: return Status::NotFound(msg);
    case grpc::StatusCode::DATA_LOSS: return Status::Corruption(msg);
    case grpc::StatusCode::FAILED_PRECONDITION: return Status::FailedPrecondition(msg);
    case grpc::StatusCode::OUT_OF_RANGE: return Status::OutOfRange(msg);
    case grpc::StatusCode::ALREADY_EXISTS: return Status::AlreadyExists(msg);
    case grpc::StatusCode::UNAUTHENTICATED: return Status::Unauthenticated(msg);
    case grpc::StatusCode::DEADLINE_EXCEEDED: return Status::DeadlineExceeded(msg);
    case grpc::StatusCode::ABORTED: return Status::Aborted(msg);
    case grpc::StatusCode::UNAVAILABLE: return Status::Unavailable(msg);
    default: return Status::Internal(msg);
  }
}

}  // namespace dtrain::rpc
