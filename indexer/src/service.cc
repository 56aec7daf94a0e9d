#include "dtrain/indexer/service.h"

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <mutex>

#include "dtrain/common/rpc.h"
#include "dtrain/indexer.grpc.pb.h"
#include "dtrain/indexer/index_builder.h"
#include "dtrain/indexer/searcher.h"

namespace dtrain::indexer {
namespace {

class Service final : public dtrain::IndexBuilder::Service {
 public:
  explicit Service(const IndexerServerOptions& o) : options_(o) {}

  Status Serve(const std::string& dir) {
    SearcherOptions so;
    so.index_dir = dir;
    so.data_dir = options_.data_dir;
    so.threads = options_.threads;
    std::unique_ptr<Searcher> s;
    DTRAIN_RETURN_IF_ERROR(Searcher::Open(so, &s));
    std::shared_ptr<const Searcher> shared(std::move(s));
    std::lock_guard<std::mutex> lock(mu_);
    searcher_ = shared;
    spdlog::info("serving {}: {}", dir, DescribeManifest(shared->manifest()));
    return Status::OK();
  }

  grpc::Status Build(grpc::ServerContext* ctx, const BuildIndexRequest* req, BuildIndexReply* reply) override {
    grpc::Status auth = rpc::CheckJobToken(*ctx, options_.token);
    if (!auth.ok()) return auth;
    if (req->model().empty() || req->output_dir().empty()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "Build needs model and output_dir");
    }
    std::lock_guard<std::mutex> one_build(build_mu_);
    spdlog::info("Build: model {}, gallery {}, into {}", req->model(), req->config().gallery(), req->output_dir());
    BuildIndexRequest r = *req;
    if (!r.has_data_dir()) r.set_data_dir(options_.data_dir);
    Status st = NewLocalIndexBuilder(false)->Build(r, reply);
    if (st.ok() && req->serve()) st = Serve(req->output_dir());
    if (!st.ok()) spdlog::warn("Build failed: {}", st.ToString());
    return rpc::ToGrpc(st);
  }

  grpc::Status Load(grpc::ServerContext* ctx, const LoadIndexRequest* req, IndexInfo* reply) override {
    grpc::Status auth = rpc::CheckJobToken(*ctx, options_.token);
    if (!auth.ok()) return auth;
    Status st = Serve(req->index_dir());
    if (!st.ok()) return rpc::ToGrpc(st);
    Fill(reply);
    return grpc::Status::OK;
  }

  grpc::Status Query(grpc::ServerContext* ctx, const QueryRequest* req, QueryReply* reply) override {
    grpc::Status auth = rpc::CheckJobToken(*ctx, options_.token);
    if (!auth.ok()) return auth;
    std::shared_ptr<const Searcher> s = Current();
    if (!s) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "no index loaded (call Load or Build)");
    Status st = s->Query(*req, reply);
    if (st.ok()) queries_.fetch_add(req->queries_size());
    return rpc::ToGrpc(st);
  }

  grpc::Status Info(grpc::ServerContext* ctx, const InfoRequest*, IndexInfo* reply) override {
    grpc::Status auth = rpc::CheckJobToken(*ctx, options_.token);
    if (!auth.ok()) return auth;
    Fill(reply);
    return grpc::Status::OK;
  }

  grpc::Status Health(grpc::ServerContext* ctx, const HealthRequest*, HealthReply* reply) override {
    grpc::Status auth = rpc::CheckJobToken(*ctx, options_.token);
    if (!auth.ok()) return auth;
    const bool loaded = Current() != nullptr;
    reply->set_index_loaded(loaded);
    reply->set_status(loaded ? "serving" : "no index loaded");
    return grpc::Status::OK;
  }

 private:
  std::shared_ptr<const Searcher> Current() {
    std::lock_guard<std::mutex> lock(mu_);
    return searcher_;
  }
  void Fill(IndexInfo* info) {
    std::shared_ptr<const Searcher> s = Current();
    info->set_loaded(s != nullptr);
    info->set_queries_served(queries_.load());
    if (s) {
      info->set_index_dir(s->dir());
      *info->mutable_manifest() = s->manifest();
    }
  }

  IndexerServerOptions options_;
  std::mutex mu_;
  std::shared_ptr<const Searcher> searcher_;
  std::mutex build_mu_;
  std::atomic<int64_t> queries_{0};
};

}  // namespace

struct IndexerServer::Impl {
  std::unique_ptr<Service> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};

IndexerServer::~IndexerServer() { Shutdown(); }

Status IndexerServer::Start(const IndexerServerOptions& o, std::unique_ptr<IndexerServer>* out) {
  if (o.token.empty()) return Status::InvalidArgument("dtrain-indexer needs a job token");
  std::unique_ptr<IndexerServer> s(new IndexerServer());
  s->impl_ = std::make_unique<Impl>();
  s->impl_->service = std::make_unique<Service>(o);
  if (!o.index_dir.empty()) DTRAIN_RETURN_IF_ERROR(s->impl_->service->Serve(o.index_dir));
  rpc::ServerSetup setup;
  setup.bind_address = o.bind_address;
  setup.port = o.port;
  setup.max_message_bytes = o.max_message_bytes;
  DTRAIN_RETURN_IF_ERROR(rpc::StartServer(setup, s->impl_->service.get(), &s->impl_->server, &s->impl_->port));
  spdlog::info("dtrain-indexer listening on {}:{}", o.bind_address, s->impl_->port);
  *out = std::move(s);
  return Status::OK();
}

int IndexerServer::port() const { return impl_ ? impl_->port : 0; }

void IndexerServer::Shutdown() {
  if (impl_) rpc::StopServer(&impl_->server);
}

}  // namespace dtrain::indexer
