#include "dtrain/paramserver/service.h"

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <future>

#include "dtrain/common/rpc.h"
#include "dtrain/paramserver.grpc.pb.h"
#include "dtrain/paramserver/wire.h"

namespace dtrain::paramserver {
namespace {

// HTTP/2 settings for streams of megabytes: a large flow-control look-ahead
// and frames, so one stream is not throttled to gRPC's 64 KiB defaults
// (bench/paramserver measures the effect).
std::vector<std::pair<std::string, int>> LargeTransferArgs() {
  return {{GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 << 20},
          {GRPC_ARG_HTTP2_MAX_FRAME_SIZE, (16 << 20) - 1},
          {GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, 8 << 20}};
}

class Service final : public ParameterServer::Service {
 public:
  Service(const PsServerOptions& o, std::unique_ptr<ParameterShard> shard) : options_(o), shard_(std::move(shard)) {}

  ParameterShard& shard() { return *shard_; }

  grpc::Status Init(grpc::ServerContext* ctx, grpc::ServerReader<InitShardRequest>* reader,
                    InitShardReply* reply) override {
    grpc::Status auth = rpc::CheckJobToken(*ctx, options_.token);
    if (!auth.ok()) return auth;
    SliceAssembler assembler(Lengths());
    InitShardRequest msg;
    int64_t version = 0;
    bool first = true;
    while (reader->Read(&msg)) {
      if (first) version = msg.version();
      first = false;
      for (const TensorChunk& c : msg.chunks()) {
        Status st = assembler.Add(c);
        if (!st.ok()) return rpc::ToGrpc(st);
      }
    }
    std::vector<SliceView> views;
    Status st = assembler.Finish(&views);
    if (st.ok()) st = shard_->Initialize(views, version);
    if (!st.ok()) return rpc::ToGrpc(st);
    reply->set_version(version);
    return grpc::Status::OK;
  }

  grpc::Status Push(grpc::ServerContext* ctx, grpc::ServerReader<PushRequest>* reader, PushReply* reply) override {
    grpc::Status auth = rpc::CheckJobToken(*ctx, options_.token);
    if (!auth.ok()) return auth;
    SliceAssembler assembler(Lengths());
    PushRequest msg;
    int64_t base = 0;
    bool first = true;
    while (reader->Read(&msg)) {
      if (first) base = msg.base_version();
      first = false;
      for (const TensorChunk& c : msg.chunks()) {
        Status st = assembler.Add(c);
        if (!st.ok()) return rpc::ToGrpc(st);
      }
    }
    if (first) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "empty push");
    std::vector<SliceView> views;
    Status st = assembler.Finish(&views);
    PushResult r;
    if (st.ok()) st = shard_->Push(base, views, &r);
    if (!st.ok()) return rpc::ToGrpc(st);
    reply->set_version(r.version);
    reply->set_staleness(r.staleness);
    reply->set_skipped(r.skipped);
    return grpc::Status::OK;
  }

  grpc::Status Pull(grpc::ServerContext* ctx, const PullRequest* req, grpc::ServerWriter<PullReply>* writer) override {
    grpc::Status auth = rpc::CheckJobToken(*ctx, options_.token);
    if (!auth.ok()) return auth;
    // Chunks are cut straight from the slices under their locks (the one copy
    // of the values) into messages; the messages are written after the locks
    // are released, so a slow client never holds up pushes.
    std::vector<PullReply> messages(1);
    int64_t bytes = 0;
    int64_t version = 0;
    Status st = shard_->VisitChanged(req->since_version(), &version, [&](const ParamSlice& s, const float* v) {
      ChunkSlice(s.name, s.offset, v, s.length, req->encoding(), options_.chunk_bytes, [&](TensorChunk&& c) {
        const int64_t size = static_cast<int64_t>(c.data().size());
        if (bytes > 0 && bytes + size > options_.chunk_bytes) {
          messages.emplace_back();
          bytes = 0;
        }
        bytes += size;
        *messages.back().add_chunks() = std::move(c);
      });
    });
    if (!st.ok()) return rpc::ToGrpc(st);
    for (PullReply& m : messages) {
      m.set_version(version);
      if (!writer->Write(m)) return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
    }
    return grpc::Status::OK;
  }

  grpc::Status Info(grpc::ServerContext* ctx, const ShardInfoRequest*, ShardInfo* info) override {
    grpc::Status auth = rpc::CheckJobToken(*ctx, options_.token);
    if (!auth.ok()) return auth;
    info->set_shard(shard_->shard());
    info->set_version(shard_->version());
    info->set_initialized(shard_->initialized());
    for (const ParamSlice& s : shard_->slices()) {
      ShardInfo::Slice* x = info->add_slices();
      x->set_name(s.name);
      x->set_offset(s.offset);
      x->set_length(s.length);
    }
    const ShardCounters c = shard_->counters();
    info->set_applied(c.applied);
    info->set_rejected_stale(c.rejected_stale);
    info->set_rejected_invalid(c.rejected_invalid);
    info->set_skipped_nonfinite(c.skipped_nonfinite);
    for (const auto& [s, n] : c.staleness_histogram) {
      ShardInfo::StalenessCount* h = info->add_staleness_histogram();
      h->set_staleness(s);
      h->set_pushes(n);
    }
    return grpc::Status::OK;
  }

 private:
  std::function<int64_t(const std::string&, int64_t)> Lengths() {
    ParameterShard* s = shard_.get();
    return [s](const std::string& name, int64_t offset) { return s->SliceLength(name, offset); };
  }

  PsServerOptions options_;
  std::unique_ptr<ParameterShard> shard_;
};

}  // namespace

struct PsServer::Impl {
  std::unique_ptr<Service> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};

PsServer::~PsServer() { Shutdown(); }

Status PsServer::Start(const PsServerOptions& o, std::unique_ptr<PsServer>* out) {
  if (o.token.empty()) return Status::InvalidArgument("a parameter server needs a job token");
  std::unique_ptr<ParameterShard> shard;
  DTRAIN_RETURN_IF_ERROR(ParameterShard::Create(o.shard, &shard));
  std::unique_ptr<PsServer> s(new PsServer());
  s->impl_ = std::make_unique<Impl>();
  s->impl_->service = std::make_unique<Service>(o, std::move(shard));
  rpc::ServerSetup setup;
  setup.bind_address = o.bind_address;
  setup.port = o.port;
  setup.max_message_bytes = o.max_message_bytes;
  // Pollers: parallelism.async.server_threads; gRPC adds threads for RPCs in
  // flight, so a burst of workers is queued, not refused.
  setup.max_pollers = std::max(1, o.threads);
  setup.int_args = LargeTransferArgs();
  DTRAIN_RETURN_IF_ERROR(rpc::StartServer(setup, s->impl_->service.get(), &s->impl_->server, &s->impl_->port));
  spdlog::info("parameter-server shard {} listening on {}:{} ({} slices)", o.shard.shard, o.bind_address,
               s->impl_->port, o.shard.slices.size());
  *out = std::move(s);
  return Status::OK();
}

int PsServer::port() const { return impl_ ? impl_->port : 0; }

ParameterShard& PsServer::shard() { return impl_->service->shard(); }

void PsServer::Shutdown() {
  if (impl_) rpc::StopServer(&impl_->server);
}

// ---- client ---------------------------------------------------------------------------

struct PsClient::Impl {
  PsClientOptions options;
  std::vector<std::unique_ptr<ParameterServer::Stub>> stubs;

  void Prepare(grpc::ClientContext* ctx) const {
    rpc::AttachJobToken(ctx, options.token);
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(static_cast<int64_t>(options.timeout_s * 1000)));
  }
  std::string Where(int s) const { return "shard " + std::to_string(s) + " at " + options.addresses[s]; }

  // Streams shard s's slices of `tensors` as messages of type Req.
  template <typename Req, typename Writer>
  Status Stream(int s, const ConstTensors& tensors, const std::function<void(Req*)>& header, Writer* writer,
                int64_t* bytes) const {
    Req msg;
    header(&msg);
    int64_t size = 0;
    bool ok = true;
    for (const ParamSlice& sl : options.plan.shards[s]) {
      auto it = tensors.find(sl.name);
      if (it == tensors.end()) return Status::InvalidArgument("no tensor '" + sl.name + "' to send");
      ChunkSlice(sl.name, sl.offset, it->second + sl.offset, sl.length, options.encoding, options.chunk_bytes,
                 [&](TensorChunk&& c) {
                   if (!ok) return;
                   const int64_t n = static_cast<int64_t>(c.data().size());
                   if (size > 0 && size + n > options.chunk_bytes) {
                     ok = writer->Write(msg);
                     msg.clear_chunks();
                     size = 0;
                   }
                   size += n;
                   *bytes += n;
                   *msg.add_chunks() = std::move(c);
                 });
    }
    if (ok && msg.chunks_size() > 0) ok = writer->Write(msg);
    (void)ok;  // a failed write shows in Finish()'s status
    return Status::OK();
  }
};

PsClient::~PsClient() = default;

Status PsClient::Connect(const PsClientOptions& o, std::unique_ptr<PsClient>* out) {
  if (o.addresses.empty() || static_cast<int>(o.addresses.size()) != o.plan.num_shards) {
    return Status::InvalidArgument("the shard plan has " + std::to_string(o.plan.num_shards) + " shards but " +
                                   std::to_string(o.addresses.size()) + " addresses were given");
  }
  std::unique_ptr<PsClient> c(new PsClient());
  c->impl_ = std::make_unique<Impl>();
  c->impl_->options = o;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(o.max_message_bytes);
  args.SetMaxSendMessageSize(o.max_message_bytes);
  for (const auto& [key, value] : LargeTransferArgs()) args.SetInt(key, value);
  for (const std::string& a : o.addresses) {
    c->impl_->stubs.push_back(
        ParameterServer::NewStub(grpc::CreateCustomChannel(a, grpc::InsecureChannelCredentials(), args)));
  }
  c->versions_.assign(o.addresses.size(), -1);
  *out = std::move(c);
  return Status::OK();
}

Status PsClient::Init(const ConstTensors& values, int64_t version) {
  for (int s = 0; s < static_cast<int>(impl_->stubs.size()); ++s) {
    grpc::ClientContext ctx;
    impl_->Prepare(&ctx);
    InitShardReply reply;
    auto writer = impl_->stubs[s]->Init(&ctx, &reply);
    DTRAIN_RETURN_IF_ERROR(impl_->Stream<InitShardRequest>(
        s, values, [version](InitShardRequest* m) { m->set_version(version); }, writer.get(), &bytes_pushed_));
    writer->WritesDone();
    DTRAIN_RETURN_IF_ERROR(rpc::FromGrpc(writer->Finish(), "Init of " + impl_->Where(s)));
  }
  return Status::OK();
}

Status PsClient::Push(const ConstTensors& grads, std::vector<PushReply>* replies) {
  const int n = static_cast<int>(impl_->stubs.size());
  std::vector<PushReply> out(static_cast<size_t>(n));
  std::vector<int64_t> bytes(static_cast<size_t>(n), 0);
  std::vector<std::future<Status>> calls;
  for (int s = 0; s < n; ++s) {
    calls.push_back(std::async(std::launch::async, [&, s]() -> Status {
      grpc::ClientContext ctx;
      impl_->Prepare(&ctx);
      auto writer = impl_->stubs[s]->Push(&ctx, &out[static_cast<size_t>(s)]);
      const int64_t base = std::max<int64_t>(versions_[static_cast<size_t>(s)], 0);
      DTRAIN_RETURN_IF_ERROR(impl_->Stream<PushRequest>(
          s, grads, [base](PushRequest* m) { m->set_base_version(base); }, writer.get(), &bytes[static_cast<size_t>(s)]));
      writer->WritesDone();
      return rpc::FromGrpc(writer->Finish(), "Push to " + impl_->Where(s));
    }));
  }
  Status first_error;
  for (int s = 0; s < n; ++s) {
    Status st = calls[static_cast<size_t>(s)].get();
    bytes_pushed_ += bytes[static_cast<size_t>(s)];
    if (!st.ok() && first_error.ok()) first_error = st;
  }
  if (replies) *replies = out;
  return first_error;
}

Status PsClient::Pull(const Tensors& params) {
  const int n = static_cast<int>(impl_->stubs.size());
  std::vector<int64_t> bytes(static_cast<size_t>(n), 0), got_version(static_cast<size_t>(n), -1);
  std::vector<std::future<Status>> calls;
  for (int s = 0; s < n; ++s) {
    calls.push_back(std::async(std::launch::async, [&, s]() -> Status {
      grpc::ClientContext ctx;
      impl_->Prepare(&ctx);
      PullRequest req;
      req.set_since_version(versions_[static_cast<size_t>(s)]);
      req.set_encoding(impl_->options.encoding);
      auto reader = impl_->stubs[s]->Pull(&ctx, req);
      PullReply msg;
      while (reader->Read(&msg)) {
        got_version[static_cast<size_t>(s)] = msg.version();
        for (const TensorChunk& c : msg.chunks()) {
          auto it = params.find(c.name());
          if (it == params.end()) return Status::InvalidArgument(impl_->Where(s) + " sent unknown tensor '" + c.name() + "'");
          const int64_t elems = static_cast<int64_t>(c.data().size()) / BytesPerElement(c.encoding());
          if (c.chunk_offset() < 0 || c.chunk_offset() + elems > c.length()) {
            return Status::Corruption(impl_->Where(s) + " sent a chunk outside its slice of '" + c.name() + "'");
          }
          int64_t m = 0;
          DTRAIN_RETURN_IF_ERROR(DecodeChunk(c, it->second + c.offset() + c.chunk_offset(), &m));
          bytes[static_cast<size_t>(s)] += static_cast<int64_t>(c.data().size());
        }
      }
      return rpc::FromGrpc(reader->Finish(), "Pull from " + impl_->Where(s));
    }));
  }
  Status first_error;
  for (int s = 0; s < n; ++s) {
    Status st = calls[static_cast<size_t>(s)].get();
    bytes_pulled_ += bytes[static_cast<size_t>(s)];
    if (st.ok() && got_version[static_cast<size_t>(s)] >= 0) versions_[static_cast<size_t>(s)] = got_version[static_cast<size_t>(s)];
    if (!st.ok() && first_error.ok()) first_error = st;
  }
  return first_error;
}

Status PsClient::Info(int shard, ShardInfo* info) {
  if (shard < 0 || shard >= static_cast<int>(impl_->stubs.size())) return Status::InvalidArgument("no shard " + std::to_string(shard));
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx);
  return rpc::FromGrpc(impl_->stubs[shard]->Info(&ctx, ShardInfoRequest(), info), "Info of " + impl_->Where(shard));
}

}  // namespace dtrain::paramserver
