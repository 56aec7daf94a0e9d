// What every dtrain gRPC service and client shares: the job token check and
// the mapping between dtrain::Status and grpc::Status.
//
// Authentication: a client attaches the job token as the metadata entry
// "x-dtrain-token"; a service checks it first thing in every handler, before
// it reads the request, so an unauthenticated call changes nothing. The
// comparison takes the same time wherever the tokens differ. Services bind
// 127.0.0.1 unless configured otherwise (launch.bind_address); the token is
// what protects a service bound to another address.
//
// Thread-safety: the functions share no state.
#pragma once

#include <grpcpp/client_context.h>
#include <grpcpp/server.h>
#include <grpcpp/server_context.h>
#include <grpcpp/support/status.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "dtrain/common/status.h"

namespace dtrain::rpc {

inline constexpr const char* kTokenMetadataKey = "x-dtrain-token";

// OK when `context` carries `expected`; UNAUTHENTICATED ("missing job token"
// or "wrong job token") otherwise. An empty `expected` is a service set up
// without a token: every call is refused, so a misconfigured service is
// closed rather than open.
grpc::Status CheckJobToken(const grpc::ServerContext& context, const std::string& expected);

// Attaches `token` to an outgoing call.
void AttachJobToken(grpc::ClientContext* context, const std::string& token);

// The job token of this process: DTRAIN_JOB_TOKEN, else the first line of
// `token_file` when it is not empty. NotFound, saying how to give one, when
// neither is there.
Status LoadJobToken(const std::string& token_file, std::string* token);

// A fresh random token (32 hex digits from std::random_device).
std::string NewJobToken();

// How a dtrain service listens (both dtrain-indexer and dtrain-ps use it).
struct ServerSetup {
  std::string bind_address = "127.0.0.1";
  int port = 0;  // 0: pick a free one
  int max_message_bytes = 64 << 20;
  // Threads polling for RPCs (0: gRPC's default); gRPC adds threads while
  // many RPCs are in flight.
  int max_pollers = 0;
  // Extra integer channel arguments (e.g. HTTP/2 window sizes).
  std::vector<std::pair<std::string, int>> int_args;
};

// Builds and starts a synchronous gRPC server for `service` (which must
// outlive it). Unavailable naming the address when it cannot listen.
Status StartServer(const ServerSetup& setup, grpc::Service* service, std::unique_ptr<grpc::Server>* server,
                   int* port);

// Shuts the server down, letting RPCs in flight finish for up to 5 s; a
// second call does nothing.
void StopServer(std::unique_ptr<grpc::Server>* server);

// dtrain::Status <-> grpc::Status, keeping the code and the message.
grpc::Status ToGrpc(const Status& status);
// `what` names the call for the message: "IndexBuilder.Build to 127.0.0.1:5000".
Status FromGrpc(const grpc::Status& status, const std::string& what);

}  // namespace dtrain::rpc
