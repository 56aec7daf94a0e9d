#include "dtrain/paramserver/service.h"

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <future>
#include <mutex>

#include <malloc.h>
#include <unistd.h>

#include "dtrain/common/lr_schedule.h"
#include "dtrain/common/rpc.h"
#include "dtrain/paramserver.grpc.pb.h"
#include "dtrain/paramserver/wire.h"
#include "dtrain/paramserver/wire_codec.h"

namespace dtrain::paramserver {
namespace {

// HTTP/2 settings for streams of megabytes: a large flow-control look-ahead
// and frames, so one stream is not throttled to gRPC's 64 KiB defaults
// (bench/paramserver measures the effect).
std::vector<std::pair<std::string, int>> LargeTransferArgs() {
  return {{GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 << 20},
          {GRPC_ARG_HTTP2_MAX_FRAME_SIZE, (16 << 20) - 1},
          {GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, 8 << 20},
          {GRPC_ARG_TCP_READ_CHUNK_SIZE, 4 << 20},
          {GRPC_ARG_TCP_MIN_READ_CHUNK_SIZE, 256 << 10},
          {GRPC_ARG_TCP_MAX_READ_CHUNK_SIZE, 4 << 20}};
}

// The LR of the update from version v: lr_scale x the job's schedule at step
// v / updates_per_step.
std::function<double(int64_t)> LrFromSetup(const ShardSetup& setup) {
  LrScheduleOptions o;
  o.schedule = setup.schedule();
  o.base_lr = setup.base_lr();
  o.total_steps = std::max<int64_t>(setup.total_steps(), 1);
  o.steps_per_epoch = std::max<int64_t>(setup.steps_per_epoch(), 1);
  const int64_t per_step = std::max(1, setup.updates_per_step());
  const double scale = setup.lr_scale();
  return [o, per_step, scale](int64_t v) { return scale * LearningRate(o, v / per_step); };
}

// The methods of ParameterServer (proto/dtrain/paramserver.proto). The
// streamed messages travel as raw buffers encoded and parsed by
// wire_codec.h, so tensor data is not copied on the way; the bytes are the
// protobuf encoding of InitShardRequest, PushRequest and PullReply.
constexpr char kInitMethod[] = "/dtrain.ParameterServer/Init";
constexpr char kPushMethod[] = "/dtrain.ParameterServer/Push";
constexpr char kPullMethod[] = "/dtrain.ParameterServer/Pull";
constexpr char kInfoMethod[] = "/dtrain.ParameterServer/Info";

// Field numbers of the streamed messages.
namespace field {
constexpr int kInitVersion = 1, kInitChunks = 2, kInitSetup = 3, kInitOptimizerStep = 4;
constexpr int kPushBaseVersion = 1, kPushWorker = 2, kPushChunks = 3;
constexpr int kPullVersion = 1, kPullChunks = 2, kPullOptimizerStep = 3;
}  // namespace field

class Service final : public grpc::Service {
 public:
  Service(const PsServerOptions& o, std::shared_ptr<ParameterShard> shard) : options_(o), shard_(std::move(shard)) {
    using grpc::internal::RpcMethod;
    using grpc::internal::RpcServiceMethod;
    using Bytes = grpc::ByteBuffer;
    AddMethod(new RpcServiceMethod(
        kInitMethod, RpcMethod::CLIENT_STREAMING,
        new grpc::internal::ClientStreamingHandler<Service, Bytes, InitShardReply>(
            [](Service* s, grpc::ServerContext* ctx, grpc::ServerReader<Bytes>* r, InitShardReply* reply) {
              return s->Init(ctx, r, reply);
            },
            this)));
    AddMethod(new RpcServiceMethod(
        kPushMethod, RpcMethod::CLIENT_STREAMING,
        new grpc::internal::ClientStreamingHandler<Service, Bytes, PushReply>(
            [](Service* s, grpc::ServerContext* ctx, grpc::ServerReader<Bytes>* r, PushReply* reply) {
              return s->Push(ctx, r, reply);
            },
            this)));
    AddMethod(new RpcServiceMethod(
        kPullMethod, RpcMethod::SERVER_STREAMING,
        new grpc::internal::ServerStreamingHandler<Service, PullRequest, Bytes>(
            [](Service* s, grpc::ServerContext* ctx, const PullRequest* req, grpc::ServerWriter<Bytes>* w) {
              return s->Pull(ctx, req, w);
            },
            this)));
    AddMethod(new RpcServiceMethod(
        kInfoMethod, RpcMethod::NORMAL_RPC,
        new grpc::internal::RpcMethodHandler<Service, ShardInfoRequest, ShardInfo, grpc::protobuf::MessageLite,
                                             grpc::protobuf::MessageLite>(
            [](Service* s, grpc::ServerContext* ctx, const ShardInfoRequest* req, ShardInfo* info) {
              return s->Info(ctx, req, info);
            },
            this)));
  }

  std::shared_ptr<ParameterShard> shard() const {
    std::lock_guard<std::mutex> lock(mu_);
    return shard_;
  }

  grpc::Status Init(grpc::ServerContext* ctx, grpc::ServerReader<grpc::ByteBuffer>* reader, InitShardReply* reply) {
    grpc::Status auth = rpc::CheckJobToken(*ctx, options_.token);
    if (!auth.ok()) return auth;
    std::deque<WireMessage> messages(1);  // alive until applied (see Push)
    grpc::ByteBuffer buffer;
    if (!reader->Read(&buffer)) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "empty Init");
    Status parsed = ParseWireMessage(buffer, field::kInitChunks, &messages.back());
    if (!parsed.ok()) return rpc::ToGrpc(parsed.WithContext("Init"));
    const WireMessage& msg = messages.front();
    const int64_t version = msg.int64(field::kInitVersion);
    const int64_t optimizer_step = msg.int64(field::kInitOptimizerStep);
    // The shard to initialise: a new one from the setup, or the current one.
    std::shared_ptr<ParameterShard> target;
    if (msg.bytes.count(field::kInitSetup) > 0) {
      ShardSetup setup;
      if (!setup.ParseFromString(msg.bytes.at(field::kInitSetup))) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "Init: the shard setup is not a valid ShardSetup");
      }
      if (setup.shard() != options_.shard.shard) {
        return rpc::ToGrpc(Status::InvalidArgument("this is shard " + std::to_string(options_.shard.shard) +
                                                   ", the Init is for shard " + std::to_string(setup.shard())));
      }
      ShardOptions so = options_.shard;
      so.slices.clear();
      for (const ShardSetup::Slice& x : setup.slices()) {
        so.slices.push_back(ParamSlice{x.name(), x.offset(), x.length(), setup.shard()});
      }
      if (setup.has_schedule()) so.lr_at = LrFromSetup(setup);
      std::unique_ptr<ParameterShard> fresh;
      Status st = ParameterShard::Create(so, &fresh);
      if (!st.ok()) return rpc::ToGrpc(st.WithContext("Init setup"));
      target = std::move(fresh);
    } else {
      target = shard();
      if (!target) {
        return rpc::ToGrpc(Status::FailedPrecondition("shard " + std::to_string(options_.shard.shard) +
                                                      " started empty: its first Init must carry a setup"));
      }
    }
    ParameterShard* t = target.get();
    SliceAssembler assembler([t](const std::string& name, int64_t offset) { return t->SliceLength(name, offset); });
    while (true) {
      for (const ChunkRef& c : messages.back().chunks) {
        Status st = assembler.Add(c);
        if (!st.ok()) return rpc::ToGrpc(st);
      }
      if (!reader->Read(&buffer)) break;
      messages.emplace_back();
      Status st = ParseWireMessage(buffer, field::kInitChunks, &messages.back());
      if (!st.ok()) return rpc::ToGrpc(st.WithContext("Init"));
    }
    std::vector<SliceView> views;
    Status st = assembler.Finish(&views);
    if (st.ok()) st = target->Initialize(views, version, optimizer_step);
    if (!st.ok()) return rpc::ToGrpc(st);
    {
      std::lock_guard<std::mutex> lock(mu_);
      shard_ = target;
    }
    spdlog::info("shard {}: initialised at version {} ({} slices)", options_.shard.shard, version,
                 target->slices().size());
    reply->set_version(version);
    return grpc::Status::OK;
  }

  grpc::Status Push(grpc::ServerContext* ctx, grpc::ServerReader<grpc::ByteBuffer>* reader, PushReply* reply) {
    grpc::Status auth = rpc::CheckJobToken(*ctx, options_.token);
    if (!auth.ok()) return auth;
    std::shared_ptr<ParameterShard> shard;
    grpc::Status ready = Ready(&shard);
    if (!ready.ok()) return ready;
    SliceAssembler assembler(Lengths(shard.get()));
    // Every message stays alive until the push is applied: the assembler
    // points into the received buffers instead of copying whole slices.
    std::deque<WireMessage> messages;
    int64_t base = 0;
    int worker = -1;
    bool first = true;
    grpc::ByteBuffer buffer;
    while (reader->Read(&buffer)) {
      messages.emplace_back();
      Status parsed = ParseWireMessage(buffer, field::kPushChunks, &messages.back());
      if (!parsed.ok()) return rpc::ToGrpc(parsed.WithContext("Push"));
      const WireMessage& msg = messages.back();
      if (first) {
        base = msg.int64(field::kPushBaseVersion);
        worker = msg.int32(field::kPushWorker, -1);
      }
      first = false;
      for (const ChunkRef& c : msg.chunks) {
        Status st = assembler.Add(c);
        if (!st.ok()) return rpc::ToGrpc(st);
      }
    }
    if (first) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "empty push");
    std::vector<SliceView> views;
    Status st = assembler.Finish(&views);
    PushResult r;
    if (st.ok()) st = shard->Push(base, views, &r, worker);
    if (!st.ok()) return rpc::ToGrpc(st);
    reply->set_version(r.version);
    reply->set_staleness(r.staleness);
    reply->set_skipped(r.skipped);
    return grpc::Status::OK;
  }

  grpc::Status Pull(grpc::ServerContext* ctx, const PullRequest* req, grpc::ServerWriter<grpc::ByteBuffer>* writer) {
    grpc::Status auth = rpc::CheckJobToken(*ctx, options_.token);
    if (!auth.ok()) return auth;
    std::shared_ptr<ParameterShard> shard;
    grpc::Status ready = Ready(&shard);
    if (!ready.ok()) return ready;
    if (req->lease()) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(ctx->deadline() -
                                                                              std::chrono::system_clock::now());
      Status st = shard->AcquireLease(req->worker(), std::max(left, std::chrono::milliseconds(1)));
      if (!st.ok()) return rpc::ToGrpc(st);
    }
    // Chunks are cut from the slices under their locks into messages; the
    // messages are written after the locks are released, so a slow client
    // never holds up pushes.
    struct Part {
      TensorChunk header;
      grpc::Slice data;
    };
    std::vector<std::vector<Part>> messages(1);
    int64_t bytes = 0;
    auto add = [&](TensorChunk&& c, grpc::Slice&& data, int64_t size) {
      if (bytes > 0 && bytes + size > options_.chunk_bytes) {
        messages.emplace_back();
        bytes = 0;
      }
      bytes += size;
      messages.back().push_back(Part{std::move(c), std::move(data)});
    };
    int64_t version = 0, optimizer_step = 0;
    Status st;
    if (req->include_state()) {
      st = shard->VisitState(&version, &optimizer_step,
                             [&](const ParamSlice& s, const std::string& slot, const float* v) {
                               ChunkSliceToWire(s.name, s.offset, v, s.length, COMPRESSION_NONE, options_.chunk_bytes,
                                                {}, [&](TensorChunk&& c, grpc::Slice&& data, int64_t size) {
                                                  if (!slot.empty()) c.set_slot(slot);
                                                  add(std::move(c), std::move(data), size);
                                                });
                             });
    } else {
      // The values travel in place: each slice of the message holds a
      // reference to the shard's array, and a push that comes meanwhile
      // writes its update to another array (shard.h).
      st = shard->VisitChanged(req->since_version(), &version,
                               [&](const ParamSlice& s, const float* v, const std::shared_ptr<const float[]>& owner) {
                                 ChunkSliceToWire(s.name, s.offset, v, s.length, req->encoding(), options_.chunk_bytes,
                                                  [&owner](const float* data, size_t n) {
                                                    auto* ref = new std::shared_ptr<const float[]>(owner);
                                                    return grpc::Slice(
                                                        const_cast<float*>(data), n,
                                                        [](void* r) { delete static_cast<std::shared_ptr<const float[]>*>(r); },
                                                        ref);
                                                  },
                                                  add);
                               });
    }
    if (!st.ok()) return rpc::ToGrpc(st);
    for (std::vector<Part>& parts : messages) {
      WireBuilder m;
      m.Int64(field::kPullVersion, version);
      if (req->include_state()) m.Int64(field::kPullOptimizerStep, optimizer_step);
      for (Part& p : parts) m.Chunk(field::kPullChunks, p.header, std::move(p.data));
      if (!writer->Write(m.Finish())) return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
    }
    return grpc::Status::OK;
  }

  grpc::Status Info(grpc::ServerContext* ctx, const ShardInfoRequest*, ShardInfo* info) {
    grpc::Status auth = rpc::CheckJobToken(*ctx, options_.token);
    if (!auth.ok()) return auth;
    info->set_shard(options_.shard.shard);
    info->set_max_staleness(options_.shard.max_staleness);
    std::shared_ptr<ParameterShard> shard = this->shard();
    if (!shard) {
      info->set_initialized(false);
      return grpc::Status::OK;
    }
    info->set_version(shard->version());
    info->set_initialized(shard->initialized());
    for (const ParamSlice& s : shard->slices()) {
      ShardInfo::Slice* x = info->add_slices();
      x->set_name(s.name);
      x->set_offset(s.offset);
      x->set_length(s.length);
    }
    const ShardCounters c = shard->counters();
    info->set_applied(c.applied);
    info->set_rejected_stale(c.rejected_stale);
    info->set_rejected_invalid(c.rejected_invalid);
    info->set_skipped_nonfinite(c.skipped_nonfinite);
    info->set_lease_waits(c.lease_waits);
    info->set_lease_wait_s(c.lease_wait_s);
    for (const auto& [s, n] : c.staleness_histogram) {
      ShardInfo::StalenessCount* h = info->add_staleness_histogram();
      h->set_staleness(s);
      h->set_pushes(n);
    }
    return grpc::Status::OK;
  }

 private:
  grpc::Status Ready(std::shared_ptr<ParameterShard>* out) const {
    *out = shard();
    if (!*out) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          "shard " + std::to_string(options_.shard.shard) +
                              " is not initialised yet (the chief worker's Init has not arrived)");
    }
    return grpc::Status::OK;
  }

  static std::function<int64_t(const std::string&, int64_t)> Lengths(ParameterShard* s) {
    return [s](const std::string& name, int64_t offset) { return s->SliceLength(name, offset); };
  }

  PsServerOptions options_;
  mutable std::mutex mu_;
  std::shared_ptr<ParameterShard> shard_;  // GUARDED_BY(mu_); null until the first Init when started empty
};

}  // namespace

void KeepTransferBuffersInTheHeap() {
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_ARENA_MAX, 1);
}

PsServerOptions PsServerOptionsFromConfig(const JobConfig& config, int shard, const std::string& token) {
  const AsyncConfig& a = config.parallelism().async();
  PsServerOptions o;
  o.shard.shard = shard;
  o.shard.optimizer = config.optimizer();
  o.shard.max_staleness = a.max_staleness();
  o.shard.staleness_policy = a.staleness_policy();
  o.shard.nonfinite_policy = a.nonfinite_policy();
  o.bind_address = config.launch().bind_address();
  o.token = token;
  o.threads = a.server_threads();
  o.max_message_bytes = a.max_message_mb() << 20;
  o.chunk_bytes = std::max<int64_t>(1 << 16, static_cast<int64_t>(static_cast<double>(a.chunk_mb()) * (1 << 20)));
  return o;
}

std::string AdvertisedAddress(const std::string& bind_address, int port) {
  std::string host = bind_address;
  if (host.empty() || host == "0.0.0.0" || host == "[::]" || host == "::") {
    char name[256] = {};
    host = gethostname(name, sizeof name - 1) == 0 ? std::string(name) : std::string("localhost");
  }
  return host + ":" + std::to_string(port);
}

struct PsServer::Impl {
  std::unique_ptr<Service> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};

PsServer::~PsServer() { Shutdown(); }

Status PsServer::Start(const PsServerOptions& o, std::unique_ptr<PsServer>* out) {
  if (o.token.empty()) return Status::InvalidArgument("a parameter server needs a job token");
  std::shared_ptr<ParameterShard> shard;
  if (!o.shard.slices.empty()) {
    std::unique_ptr<ParameterShard> created;
    DTRAIN_RETURN_IF_ERROR(ParameterShard::Create(o.shard, &created));
    shard = std::move(created);
  } else {
    // Check the optimizer and bound now, so a bad config fails at start.
    ShardOptions probe = o.shard;
    std::unique_ptr<ParameterShard> created;
    DTRAIN_RETURN_IF_ERROR(ParameterShard::Create(probe, &created));
  }
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
  spdlog::info("parameter-server shard {} listening on {}:{} ({})", o.shard.shard, o.bind_address, s->impl_->port,
               o.shard.slices.empty() ? std::string("empty until the chief worker's Init")
                                      : std::to_string(o.shard.slices.size()) + " slices");
  *out = std::move(s);
  return Status::OK();
}

int PsServer::port() const { return impl_ ? impl_->port : 0; }

std::shared_ptr<ParameterShard> PsServer::shard() { return impl_->service->shard(); }

void PsServer::Shutdown() {
  if (impl_) rpc::StopServer(&impl_->server);
}

// ---- client ---------------------------------------------------------------------------

struct PsClient::Impl {
  PsClientOptions options;
  struct Shard {
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<ParameterServer::Stub> stub;  // Info
    // The streamed methods, with raw buffers (wire_codec.h).
    std::unique_ptr<grpc::internal::RpcMethod> init, push, pull;
    std::map<std::pair<std::string, int64_t>, int64_t> lengths;  // the plan's slices
  };
  std::vector<Shard> shards;

  void Prepare(grpc::ClientContext* ctx) const {
    rpc::AttachJobToken(ctx, options.token);
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(static_cast<int64_t>(options.timeout_s * 1000)));
  }
  std::string Where(int s) const { return "shard " + std::to_string(s) + " at " + options.addresses[s]; }
  int num_shards() const { return static_cast<int>(shards.size()); }

  std::unique_ptr<grpc::ClientWriter<grpc::ByteBuffer>> OpenInit(int s, grpc::ClientContext* ctx, InitShardReply* reply) const {
    const Shard& x = shards[static_cast<size_t>(s)];
    return std::unique_ptr<grpc::ClientWriter<grpc::ByteBuffer>>(
        grpc::internal::ClientWriterFactory<grpc::ByteBuffer>::Create(x.channel.get(), *x.init, ctx, reply));
  }
  std::unique_ptr<grpc::ClientWriter<grpc::ByteBuffer>> OpenPush(int s, grpc::ClientContext* ctx, PushReply* reply) const {
    const Shard& x = shards[static_cast<size_t>(s)];
    return std::unique_ptr<grpc::ClientWriter<grpc::ByteBuffer>>(
        grpc::internal::ClientWriterFactory<grpc::ByteBuffer>::Create(x.channel.get(), *x.push, ctx, reply));
  }
  std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> OpenPull(int s, grpc::ClientContext* ctx, const PullRequest& req) const {
    const Shard& x = shards[static_cast<size_t>(s)];
    return std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>>(
        grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(x.channel.get(), *x.pull, ctx, req));
  }

  // One part of a stream: the tensors of one optimizer slot ("" = values).
  struct Part {
    std::string slot;
    const ConstTensors* tensors;
  };

  // Streams shard s's slices of every part as messages whose chunks are
  // field `chunks_field`; the first message also carries `header`'s fields.
  // Float32 data travels from the tensors themselves, pinned in `pins`.
  Status Stream(int s, const std::vector<Part>& parts, Compression encoding, int chunks_field,
                const std::function<void(WireBuilder*)>& header, grpc::ClientWriter<grpc::ByteBuffer>* writer,
                SlicePins* pins, int64_t* bytes) const {
    WireBuilder msg;
    header(&msg);
    int64_t size = 0;
    bool ok = true;
    for (const Part& part : parts) {
      for (const ParamSlice& sl : options.plan.shards[s]) {
        auto it = part.tensors->find(sl.name);
        if (it == part.tensors->end()) {
          if (!part.slot.empty()) continue;  // no state for this tensor yet
          return Status::InvalidArgument("no tensor '" + sl.name + "' to send");
        }
        ChunkSliceToWire(sl.name, sl.offset, it->second + sl.offset, sl.length, encoding, options.chunk_bytes,
                         [pins](const float* data, size_t n) { return pins->Wrap(data, n); },
                         [&](TensorChunk&& c, grpc::Slice&& data, int64_t n) {
                           if (!ok) return;
                           if (!part.slot.empty()) c.set_slot(part.slot);
                           if (size > 0 && size + n > options.chunk_bytes) {
                             ok = writer->Write(msg.Finish());
                             size = 0;
                           }
                           size += n;
                           *bytes += n;
                           msg.Chunk(chunks_field, c, std::move(data));
                         });
      }
    }
    if (ok && !msg.empty()) ok = writer->Write(msg.Finish());
    (void)ok;  // a failed write shows in Finish()'s status
    return Status::OK();
  }

  // Runs f(s) for the shards in `order`: each group in parallel, groups one
  // after another. Returns each shard's status.
  std::vector<Status> ForShards(const std::vector<std::vector<int>>& groups, const std::function<Status(int)>& f) const {
    std::vector<Status> out(static_cast<size_t>(num_shards()));
    for (const std::vector<int>& group : groups) {
      std::vector<std::future<Status>> calls;
      for (int s : group) calls.push_back(std::async(std::launch::async, f, s));
      for (size_t i = 0; i < group.size(); ++i) out[static_cast<size_t>(group[i])] = calls[i].get();
    }
    return out;
  }

  // Pushes go to shard 0 last under WAIT (its lease orders every shard);
  // pulls read shard 0 (taking the lease) first.
  std::vector<std::vector<int>> Groups(const std::vector<bool>* only, bool zero_last) const {
    std::vector<int> zero, rest;
    for (int s = 0; s < num_shards(); ++s) {
      if (only && !(*only)[static_cast<size_t>(s)]) continue;
      (s == 0 && options.staleness_policy == AsyncConfig::WAIT ? zero : rest).push_back(s);
    }
    if (zero.empty()) return {rest};
    return zero_last ? std::vector<std::vector<int>>{rest, zero} : std::vector<std::vector<int>>{zero, rest};
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
  // A connection of its own: gRPC otherwise shares one TCP connection (its
  // subchannel) between all channels of a process to the same address, so
  // the workers of one process (bench/paramserver, tests) would queue on a
  // single connection where separate worker processes would not.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  for (size_t i = 0; i < o.addresses.size(); ++i) {
    Impl::Shard x;
    x.channel = grpc::CreateCustomChannel(o.addresses[i], grpc::InsecureChannelCredentials(), args);
    x.stub = ParameterServer::NewStub(x.channel);
    using grpc::internal::RpcMethod;
    x.init = std::make_unique<RpcMethod>(kInitMethod, RpcMethod::CLIENT_STREAMING, x.channel);
    x.push = std::make_unique<RpcMethod>(kPushMethod, RpcMethod::CLIENT_STREAMING, x.channel);
    x.pull = std::make_unique<RpcMethod>(kPullMethod, RpcMethod::SERVER_STREAMING, x.channel);
    for (const ParamSlice& sl : o.plan.shards[i]) x.lengths[{sl.name, sl.offset}] = sl.length;
    c->impl_->shards.push_back(std::move(x));
  }
  c->versions_.assign(o.addresses.size(), -1);
  *out = std::move(c);
  return Status::OK();
}

Status PsClient::Init(const ConstTensors& values, int64_t version) {
  PsInitOptions o;
  o.send_setup = false;
  return Init(values, version, o);
}

Status PsClient::Init(const ConstTensors& values, int64_t version, const PsInitOptions& options) {
  std::vector<Impl::Part> parts = {{"", &values}};
  for (const auto& [slot, tensors] : options.slots) parts.push_back({slot, &tensors});
  for (int s = 0; s < impl_->num_shards(); ++s) {
    grpc::ClientContext ctx;
    impl_->Prepare(&ctx);
    InitShardReply reply;
    SlicePins pins;  // declared before the call: released after it
    auto writer = impl_->OpenInit(s, &ctx, &reply);
    auto header = [&](WireBuilder* m) {
      m->Int64(field::kInitVersion, version);
      m->Int64(field::kInitOptimizerStep, options.optimizer_step);
      if (!options.send_setup) return;
      ShardSetup setup = options.setup;
      setup.set_shard(s);
      setup.set_num_shards(impl_->num_shards());
      setup.clear_slices();
      for (const ParamSlice& sl : impl_->options.plan.shards[s]) {
        ShardSetup::Slice* x = setup.add_slices();
        x->set_name(sl.name);
        x->set_offset(sl.offset);
        x->set_length(sl.length);
      }
      m->Message(field::kInitSetup, setup);
    };
    // Initial values travel exactly, whatever the transport encoding.
    DTRAIN_RETURN_IF_ERROR(impl_->Stream(s, parts, COMPRESSION_NONE, field::kInitChunks, header, writer.get(), &pins,
                                         &bytes_pushed_));
    writer->WritesDone();
    DTRAIN_RETURN_IF_ERROR(rpc::FromGrpc(writer->Finish(), "Init of " + impl_->Where(s)));
    versions_[static_cast<size_t>(s)] = -1;
  }
  return Status::OK();
}

Status PsClient::Push(const ConstTensors& grads, std::vector<PushReply>* replies, std::vector<Status>* statuses,
                      const std::vector<bool>* only, const std::vector<int64_t>* base_versions) {
  const int n = impl_->num_shards();
  if (only && static_cast<int>(only->size()) != n) return Status::InvalidArgument("Push: `only` needs one flag per shard");
  if (base_versions && static_cast<int>(base_versions->size()) != n) {
    return Status::InvalidArgument("Push: `base_versions` needs one version per shard");
  }
  const std::vector<int64_t>& bases = base_versions ? *base_versions : versions_;
  std::vector<PushReply> out(static_cast<size_t>(n));
  std::vector<int64_t> bytes(static_cast<size_t>(n), 0);
  const std::vector<Impl::Part> parts = {{"", &grads}};
  std::vector<Status> results = impl_->ForShards(impl_->Groups(only, /*zero_last=*/true), [&](int s) -> Status {
    SlicePins pins;  // declared before the call: released after it
    grpc::ClientContext ctx;
    impl_->Prepare(&ctx);
    auto writer = impl_->OpenPush(s, &ctx, &out[static_cast<size_t>(s)]);
    const int64_t base = std::max<int64_t>(bases[static_cast<size_t>(s)], 0);
    const int worker = impl_->options.worker;
    DTRAIN_RETURN_IF_ERROR(impl_->Stream(
        s, parts, impl_->options.encoding, field::kPushChunks,
        [base, worker](WireBuilder* m) {
          m->Int64(field::kPushBaseVersion, base);
          m->Int64(field::kPushWorker, worker);
        },
        writer.get(), &pins, &bytes[static_cast<size_t>(s)]));
    writer->WritesDone();
    return rpc::FromGrpc(writer->Finish(), "Push to " + impl_->Where(s));
  });
  Status first_error;
  for (int s = 0; s < n; ++s) {
    bytes_pushed_ += bytes[static_cast<size_t>(s)];
    if (!results[static_cast<size_t>(s)].ok() && first_error.ok()) first_error = results[static_cast<size_t>(s)];
  }
  if (replies) *replies = out;
  if (statuses) *statuses = results;
  return first_error;
}

namespace {

// Reads one Pull stream into `values` (slot "") and `slots`; every chunk must
// lie inside a slice of the shard's plan (`lengths`).
Status ReadPull(grpc::ClientReader<grpc::ByteBuffer>* reader, const std::string& where,
                const std::map<std::pair<std::string, int64_t>, int64_t>& lengths, const Tensors& values,
                const std::map<std::string, Tensors>* slots, int64_t* version, int64_t* optimizer_step,
                std::set<std::pair<std::string, std::string>>* received, int64_t* bytes) {
  grpc::ByteBuffer buffer;
  WireMessage msg;
  while (reader->Read(&buffer)) {
    DTRAIN_RETURN_IF_ERROR(ParseWireMessage(buffer, field::kPullChunks, &msg).WithContext(where));
    *version = msg.int64(field::kPullVersion);
    if (optimizer_step) *optimizer_step = std::max(*optimizer_step, msg.int64(field::kPullOptimizerStep));
    for (const ChunkRef& c : msg.chunks) {
      const Tensors* target = &values;
      if (!c.slot.empty()) {
        auto sit = slots ? slots->find(c.slot) : std::map<std::string, Tensors>::const_iterator();
        if (!slots || sit == slots->end()) return Status::InvalidArgument(where + " sent unexpected optimizer slot '" + c.slot + "'");
        target = &sit->second;
      }
      auto it = target->find(c.name);
      if (it == target->end()) return Status::InvalidArgument(where + " sent unknown tensor '" + c.name + "'");
      auto len = lengths.find({c.name, c.offset});
      if (len == lengths.end() || len->second != c.length) {
        return Status::Corruption(where + " sent '" + c.name + "' at element " + std::to_string(c.offset) +
                                  ", not a slice of its plan");
      }
      if (c.encoding != COMPRESSION_NONE && c.encoding != COMPRESSION_FP16 && c.encoding != COMPRESSION_BF16) {
        return Status::Corruption(where + " sent '" + c.name + "' in unknown encoding " + std::to_string(c.encoding));
      }
      const int64_t elems = static_cast<int64_t>(c.size) / BytesPerElement(static_cast<Compression>(c.encoding));
      if (c.chunk_offset < 0 || c.chunk_offset + elems > c.length) {
        return Status::Corruption(where + " sent a chunk outside its slice of '" + c.name + "'");
      }
      int64_t m = 0;
      DTRAIN_RETURN_IF_ERROR(DecodeChunk(c, it->second + c.offset + c.chunk_offset, &m));
      *bytes += static_cast<int64_t>(c.size);
      if (received && !c.slot.empty()) received->insert({c.slot, c.name});
    }
  }
  return Status::OK();
}

}  // namespace

Status PsClient::Pull(const Tensors& params, const PullOptions& options) {
  const int n = impl_->num_shards();
  std::vector<int64_t> bytes(static_cast<size_t>(n), 0), got_version(static_cast<size_t>(n), -1);
  const bool wait_policy = impl_->options.staleness_policy == AsyncConfig::WAIT;
  std::vector<Status> results = impl_->ForShards(impl_->Groups(nullptr, /*zero_last=*/false), [&](int s) -> Status {
    grpc::ClientContext ctx;
    impl_->Prepare(&ctx);
    PullRequest req;
    req.set_since_version(options.everything ? -1 : versions_[static_cast<size_t>(s)]);
    req.set_encoding(impl_->options.encoding);
    if (wait_policy && options.lease && s == 0) {
      req.set_lease(true);
      req.set_worker(impl_->options.worker);
    }
    auto reader = impl_->OpenPull(s, &ctx, req);
    DTRAIN_RETURN_IF_ERROR(ReadPull(reader.get(), impl_->Where(s), impl_->shards[static_cast<size_t>(s)].lengths, params, nullptr, &got_version[static_cast<size_t>(s)],
                                    nullptr, nullptr, &bytes[static_cast<size_t>(s)]));
    return rpc::FromGrpc(reader->Finish(), "Pull from " + impl_->Where(s));
  });
  Status first_error;
  for (int s = 0; s < n; ++s) {
    const Status& st = results[static_cast<size_t>(s)];
    bytes_pulled_ += bytes[static_cast<size_t>(s)];
    if (st.ok() && got_version[static_cast<size_t>(s)] >= 0) versions_[static_cast<size_t>(s)] = got_version[static_cast<size_t>(s)];
    if (!st.ok() && first_error.ok()) first_error = st;
  }
  return first_error;
}

Status PsClient::PullState(const Tensors& params, const std::map<std::string, Tensors>& slots, PsStateSnapshot* out) {
  const int n = impl_->num_shards();
  std::vector<int64_t> bytes(static_cast<size_t>(n), 0), got_version(static_cast<size_t>(n), -1),
      steps(static_cast<size_t>(n), 0);
  std::vector<std::set<std::pair<std::string, std::string>>> received(static_cast<size_t>(n));
  std::vector<Status> results = impl_->ForShards({[n] {
                                                   std::vector<int> all;
                                                   for (int s = 0; s < n; ++s) all.push_back(s);
                                                   return all;
                                                 }()},
                                                 [&](int s) -> Status {
                                                   const size_t i = static_cast<size_t>(s);
                                                   grpc::ClientContext ctx;
                                                   impl_->Prepare(&ctx);
                                                   PullRequest req;
                                                   req.set_include_state(true);
                                                   auto reader = impl_->OpenPull(s, &ctx, req);
                                                   DTRAIN_RETURN_IF_ERROR(ReadPull(reader.get(), impl_->Where(s),
                                                                                   impl_->shards[i].lengths, params,
                                                                                   &slots, &got_version[i], &steps[i],
                                                                                   &received[i], &bytes[i]));
                                                   return rpc::FromGrpc(reader->Finish(),
                                                                        "state pull from " + impl_->Where(s));
                                                 });
  *out = PsStateSnapshot();
  for (int s = 0; s < n; ++s) {
    const size_t i = static_cast<size_t>(s);
    DTRAIN_RETURN_IF_ERROR(results[i]);
    bytes_pulled_ += bytes[i];
    if (got_version[i] >= 0) versions_[i] = got_version[i];
    out->optimizer_step = std::max(out->optimizer_step, steps[i]);
    out->received.insert(received[i].begin(), received[i].end());
  }
  return Status::OK();
}

Status PsClient::Info(int shard, ShardInfo* info) {
  if (shard < 0 || shard >= impl_->num_shards()) return Status::InvalidArgument("no shard " + std::to_string(shard));
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx);
  return rpc::FromGrpc(impl_->shards[static_cast<size_t>(shard)].stub->Info(&ctx, ShardInfoRequest(), info), "Info of " + impl_->Where(shard));
}

}  // namespace dtrain::paramserver
