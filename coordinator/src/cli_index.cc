// dtrain index build|query|eval|info: the index builder from the command line,
// in-process or through a dtrain-indexer (--server HOST:PORT).
#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include <google/protobuf/text_format.h>

#include "cli_coordinator.h"
#include "dtrain/common/config.h"
#include "dtrain/common/metrics_log.h"
#include "dtrain/common/rpc.h"
#include "dtrain/coordinator/cli.h"
#include "dtrain/data/fashion_mnist.h"
#include "dtrain/indexer.grpc.pb.h"
#include "dtrain/indexer/gallery.h"
#include "dtrain/indexer/index_builder.h"
#include "dtrain/indexer/index_eval.h"
#include "dtrain/indexer/searcher.h"
#include "dtrain/indexer/vector_index.h"

namespace dtrain::cli {
namespace {
namespace fs = std::filesystem;

struct ServerArgs {
  std::string server;      // HOST:PORT of a dtrain-indexer; empty = in-process
  std::string token_file;
};

void AddServerOptions(CLI::App* cmd, ServerArgs* a) {
  cmd->add_option("--server", a->server, "use the dtrain-indexer at HOST:PORT instead of working in-process");
  cmd->add_option("--token-file", a->token_file,
                  "file holding the job token for --server (default: $DTRAIN_JOB_TOKEN)");
}

struct BuildArgs {
  std::string source;
  std::string out;
  std::string gallery;
  std::string kind;
  int64_t limit = -1;
  int hnsw_m = 0, ef_construction = 0, ef_search = 0, nlist = 0, nprobe = 0, batch = 0;
  bool from_checkpoint = false;
  bool no_progress = false;
  std::string data_dir;
  ServerArgs server;
};

Status Build(const BuildArgs& a) {
  // Start from the run's own index section when SOURCE is a run directory.
  IndexConfig config;
  std::string job_name;
  std::string data_dir = a.data_dir;
  const fs::path run_config = fs::path(a.source) / "config.textproto";
  std::string out = a.out;
  if (fs::is_directory(a.source) && fs::exists(run_config)) {
    JobConfig job;
    DTRAIN_RETURN_IF_ERROR(LoadJobConfig(run_config.string(), {}, &job));
    config = job.index();
    job_name = job.name();
    if (data_dir.empty()) data_dir = job.data().dir();
    if (out.empty()) out = (fs::path(a.source) / "index").string();
  } else {
    JobConfig defaults;
    DTRAIN_RETURN_IF_ERROR(ParseJobConfig("name: \"index\"", "defaults", {}, &defaults));
    config = defaults.index();
    if (out.empty()) return Status::InvalidArgument("--out is needed when the model is a file");
  }
  if (!a.gallery.empty()) config.set_gallery(a.gallery);
  if (!a.kind.empty()) {
    IndexConfig::Kind k;
    if (!indexer::ParseIndexKind(a.kind, &k)) return Status::InvalidArgument("--kind: use flat, hnsw or ivf, not " + a.kind);
    config.set_kind(k);
  }
  if (a.limit >= 0) config.set_gallery_limit(a.limit);
  if (a.hnsw_m > 0) config.set_hnsw_m(a.hnsw_m);
  if (a.ef_construction > 0) config.set_hnsw_ef_construction(a.ef_construction);
  if (a.ef_search > 0) config.set_hnsw_ef_search(a.ef_search);
  if (a.nlist > 0) config.set_ivf_nlist(a.nlist);
  if (a.nprobe > 0) config.set_ivf_nprobe(a.nprobe);
  if (a.batch > 0) config.set_embed_batch_size(a.batch);
  BuildIndexRequest req;
  req.set_model(fs::absolute(a.source).string());
  req.set_output_dir(fs::absolute(out).lexically_normal().string());
  *req.mutable_config() = config;
  req.set_job_name(job_name);
  req.set_from_checkpoint(a.from_checkpoint);
  if (!data_dir.empty()) req.set_data_dir(data_dir);
  std::unique_ptr<indexer::IndexBuilder> builder;
  if (a.server.server.empty()) {
    builder = indexer::NewLocalIndexBuilder(!a.no_progress);
  } else {
    std::string token;
    DTRAIN_RETURN_IF_ERROR(rpc::LoadJobToken(a.server.token_file, &token));
    builder = indexer::NewRemoteIndexBuilder(a.server.server, token);
  }
  BuildIndexReply reply;
  DTRAIN_RETURN_IF_ERROR(builder->Build(req, &reply));
  std::printf("index %s: %s\n", reply.index_dir().c_str(), indexer::DescribeManifest(reply.manifest()).c_str());
  std::printf("embedding: %.0f images/s (%.1f s); index build: %.1f s\n", reply.manifest().embed_images_per_sec(),
              reply.manifest().embed_seconds(), reply.manifest().build_seconds());
  return Status::OK();
}

struct QueryArgs {
  std::string index;
  std::vector<std::string> images;
  std::vector<std::string> dataset;  // "test:0,1,2"
  int k = 5;
  bool json = false;
  std::string model;
  int ef_search = 0, nprobe = 0;
  std::string data_dir;
  ServerArgs server;
};

Status ParseDatasetRefs(const std::string& text, QueryRequest* req) {
  const size_t colon = text.rfind(':');
  if (colon == std::string::npos) {
    return Status::InvalidArgument("--dataset " + text + ": use SPLIT:INDEX[,INDEX...], e.g. test:0,1,2");
  }
  const std::string split = text.substr(0, colon);
  std::string rest = text.substr(colon + 1);
  size_t pos = 0;
  while (pos <= rest.size()) {
    size_t comma = rest.find(',', pos);
    if (comma == std::string::npos) comma = rest.size();
    const std::string item = rest.substr(pos, comma - pos);
    char* end = nullptr;
    const long long idx = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0') return Status::InvalidArgument("--dataset " + text + ": '" + item + "' is not an index");
    QueryImage* q = req->add_queries();
    q->mutable_dataset()->set_split(split.rfind("fashion_mnist:", 0) == 0 ? split.substr(14) : split);
    q->mutable_dataset()->set_index(idx);
    pos = comma + 1;
  }
  return Status::OK();
}

std::string ResultsJson(const QueryReply& reply) {
  nlohmann::ordered_json j = nlohmann::ordered_json::array();
  for (const QueryResult& r : reply.results()) {
    nlohmann::ordered_json q;
    q["query"] = r.query();
    if (r.query_label() >= 0) q["query_label"] = r.query_label();
    q["neighbors"] = nlohmann::ordered_json::array();
    for (const Neighbor& n : r.neighbors()) {
      nlohmann::ordered_json x;
      x["id"] = n.id();
      x["score"] = n.score();
      x["label"] = n.meta().label();
      x["label_name"] = n.meta().label_name();
      x["source"] = n.meta().source();
      if (n.meta().dataset_index() >= 0) x["dataset_index"] = n.meta().dataset_index();
      q["neighbors"].push_back(x);
    }
    j.push_back(q);
  }
  return j.dump(2) + "\n";
}

void PrintResults(const QueryReply& reply) {
  const auto& names = data::ClassNames();
  for (const QueryResult& r : reply.results()) {
    std::printf("query %s", r.query().c_str());
    if (r.query_label() >= 0 && r.query_label() < static_cast<int>(names.size())) {
      std::printf("  (label %d %s)", r.query_label(), names[static_cast<size_t>(r.query_label())]);
    }
    std::printf("\n  %-4s %-20s %8s  %-14s %s\n", "rank", "id", "score", "label", "source");
    int rank = 1;
    for (const Neighbor& n : r.neighbors()) {
      std::string label = n.meta().label() >= 0 ? std::to_string(n.meta().label()) + " " + n.meta().label_name() : "-";
      std::string source = n.meta().source();
      if (n.meta().dataset_index() >= 0) source += "[" + std::to_string(n.meta().dataset_index()) + "]";
      const bool match = r.query_label() >= 0 && n.meta().label() == r.query_label();
      std::printf("  %-4d %-20lld %8.4f  %-14s %s%s\n", rank++, static_cast<long long>(n.id()), n.score(),
                  label.c_str(), source.c_str(), match ? "  *" : "");
    }
  }
}

Status Query(const QueryArgs& a) {
  QueryRequest req;
  req.set_k(a.k);
  for (const std::string& path : a.images) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return Status::NotFound("cannot read the query image " + path);
    std::stringstream ss;
    ss << in.rdbuf();
    QueryImage* q = req.add_queries();
    q->set_image_file(ss.str());
    q->set_name(path);
  }
  for (const std::string& d : a.dataset) DTRAIN_RETURN_IF_ERROR(ParseDatasetRefs(d, &req));
  if (req.queries_size() == 0) return Status::InvalidArgument("no query: give --image FILE or --dataset test:0,1");
  QueryReply reply;
  if (a.server.server.empty()) {
    if (a.index.empty()) return Status::InvalidArgument("give the INDEX directory (or --server HOST:PORT)");
    indexer::SearcherOptions so;
    so.index_dir = a.index;
    so.model = a.model;
    so.hnsw_ef_search = a.ef_search;
    so.ivf_nprobe = a.nprobe;
    if (!a.data_dir.empty()) so.data_dir = a.data_dir;
    std::unique_ptr<indexer::Searcher> searcher;
    DTRAIN_RETURN_IF_ERROR(indexer::Searcher::Open(so, &searcher));
    DTRAIN_RETURN_IF_ERROR(searcher->Query(req, &reply));
    if (!a.json) std::printf("%s\n\n", indexer::DescribeManifest(searcher->manifest()).c_str());
  } else {
    if (!a.model.empty() || a.ef_search > 0 || a.nprobe > 0 || !a.data_dir.empty()) {
      return Status::InvalidArgument("--model, --ef-search, --nprobe and --data-dir work in-process only; the "
                                     "service uses the settings of the index it serves");
    }
    std::string token;
    DTRAIN_RETURN_IF_ERROR(rpc::LoadJobToken(a.server.token_file, &token));
    auto stub = dtrain::IndexBuilder::NewStub(grpc::CreateChannel(a.server.server, grpc::InsecureChannelCredentials()));
    if (!a.index.empty()) {
      // Load INDEX unless the service already serves it (a load reopens the
      // model and the FAISS file).
      const std::string dir = fs::absolute(a.index).lexically_normal().string();
      grpc::ClientContext info_ctx;
      rpc::AttachJobToken(&info_ctx, token);
      IndexInfo info;
      DTRAIN_RETURN_IF_ERROR(
          rpc::FromGrpc(stub->Info(&info_ctx, InfoRequest(), &info), "IndexBuilder.Info at " + a.server.server));
      if (!info.loaded() || info.index_dir() != dir) {
        grpc::ClientContext ctx;
        rpc::AttachJobToken(&ctx, token);
        LoadIndexRequest lr;
        lr.set_index_dir(dir);
        DTRAIN_RETURN_IF_ERROR(rpc::FromGrpc(stub->Load(&ctx, lr, &info), "IndexBuilder.Load at " + a.server.server));
      }
    }
    grpc::ClientContext ctx;
    rpc::AttachJobToken(&ctx, token);
    DTRAIN_RETURN_IF_ERROR(rpc::FromGrpc(stub->Query(&ctx, req, &reply), "IndexBuilder.Query at " + a.server.server));
  }
  if (a.json) {
    std::fputs(ResultsJson(reply).c_str(), stdout);
  } else {
    PrintResults(reply);
    std::printf("(* = same label as the query; embedding %.1f ms, search %.2f ms)\n", reply.embed_seconds() * 1e3,
                reply.search_seconds() * 1e3);
  }
  return Status::OK();
}

struct EvalArgs {
  std::string index;
  indexer::IndexEvalOptions options;
  int ef_search = 0, nprobe = 0;
  bool json = false;
  bool no_map = false;
  std::string data_dir;
};

Status Eval(const EvalArgs& a) {
  indexer::SearcherOptions so;
  so.index_dir = a.index;
  so.hnsw_ef_search = a.ef_search;
  so.ivf_nprobe = a.nprobe;
  if (!a.data_dir.empty()) so.data_dir = a.data_dir;
  std::unique_ptr<indexer::Searcher> searcher;
  DTRAIN_RETURN_IF_ERROR(indexer::Searcher::Open(so, &searcher));
  indexer::IndexEvalOptions o = a.options;
  o.map_at_r = !a.no_map;
  if (!a.data_dir.empty()) o.data_dir = a.data_dir;
  indexer::IndexEvalReport r;
  DTRAIN_RETURN_IF_ERROR(indexer::EvaluateIndex(*searcher, o, &r));
  const std::string json = indexer::IndexEvalJson(r);
  if (a.json) {
    std::fputs(json.c_str(), stdout);
  } else {
    std::fputs(indexer::IndexEvalTable(r).c_str(), stdout);
  }
  DTRAIN_RETURN_IF_ERROR(WriteFileAtomically((fs::path(a.index) / "eval.json").string(), json));
  if (!a.json) std::printf("written to %s/eval.json\n", a.index.c_str());
  return Status::OK();
}

Status Info(const std::string& dir) {
  IndexManifest m;
  DTRAIN_RETURN_IF_ERROR(indexer::ReadIndexManifest(dir, &m));
  std::string text;
  google::protobuf::TextFormat::PrintToString(m, &text);
  std::printf("%s\n\n%s", indexer::DescribeManifest(m).c_str(), text.c_str());
  return Status::OK();
}

}  // namespace

void AddIndexCommands(CLI::App& app, int* exit_code) {
  CLI::App* index = app.add_subcommand("index", "build, query and evaluate retrieval indexes (FAISS)");
  index->require_subcommand(1);

  auto b = std::make_shared<BuildArgs>();
  CLI::App* build = index->add_subcommand(
      "build", "embed a gallery with a trained model and write a FAISS index (default: RUN_DIR/index)");
  build->add_option("MODEL", b->source, "run directory (its model.pt, or newest checkpoint) or a dtrain model file")
      ->required();
  build->add_option("--out", b->out, "index directory (default: MODEL/index for a run directory)");
  build->add_option("--gallery", b->gallery,
                    "fashion_mnist:train, fashion_mnist:test or a directory of PNG/PGM images "
                    "(default: the run's index.gallery)");
  build->add_option("--kind", b->kind, "flat (exact), hnsw or ivf (default: the run's index.kind)");
  build->add_option("--limit", b->limit, "first N gallery images only (0: all)");
  build->add_option("--hnsw-m", b->hnsw_m, "HNSW: links per node (M)");
  build->add_option("--ef-construction", b->ef_construction, "HNSW: efConstruction");
  build->add_option("--ef-search", b->ef_search, "HNSW: efSearch stored as the default");
  build->add_option("--nlist", b->nlist, "IVF: number of cells");
  build->add_option("--nprobe", b->nprobe, "IVF: cells visited per query, stored as the default");
  build->add_option("--batch", b->batch, "images per embedding batch");
  build->add_option("--data-dir", b->data_dir, "Fashion-MNIST directory");
  build->add_flag("--checkpoint", b->from_checkpoint, "use the run's newest good checkpoint, not model.pt");
  build->add_flag("--no-progress", b->no_progress, "no progress bar");
  AddServerOptions(build, &b->server);
  OnRun(build, "dtrain index build", exit_code, [b] { return Build(*b); });

  auto q = std::make_shared<QueryArgs>();
  CLI::App* query = index->add_subcommand("query", "top-k gallery items for query images");
  query->add_option("INDEX", q->index, "index directory (with --server: loaded by the service; optional)");
  query->add_option("--image", q->images, "query image file, PNG or PGM, 28x28 8-bit grayscale (repeatable)");
  query->add_option("--dataset", q->dataset, "Fashion-MNIST images: SPLIT:I[,J...], e.g. test:0,1,2 (repeatable)");
  query->add_option("-k,--top", q->k, "neighbours per query")->capture_default_str();
  query->add_flag("--json", q->json, "print JSON");
  query->add_option("--model", q->model, "embed queries with this model instead of the index's own");
  query->add_option("--ef-search", q->ef_search, "HNSW efSearch for this query");
  query->add_option("--nprobe", q->nprobe, "IVF nprobe for this query");
  query->add_option("--data-dir", q->data_dir, "Fashion-MNIST directory");
  AddServerOptions(query, &q->server);
  OnRun(query, "dtrain index query", exit_code, [q] { return Query(*q); });

  auto e = std::make_shared<EvalArgs>();
  CLI::App* eval = index->add_subcommand(
      "eval", "recall against exact search, Precision@1 and MAP@R through the index, latency and queries/s; "
              "writes INDEX/eval.json");
  eval->add_option("INDEX", e->index, "index directory")->required();
  eval->add_option("--queries", e->options.queries, "query set: fashion_mnist:test, fashion_mnist:train or a directory")
      ->capture_default_str();
  eval->add_option("--limit", e->options.limit, "first N queries only (0: all)");
  eval->add_option("--latency-queries", e->options.latency_queries, "queries timed one by one")->capture_default_str();
  eval->add_flag("--no-map", e->no_map, "skip MAP@R (it searches k = R per query)");
  eval->add_option("--map-queries", e->options.map_queries,
                   "queries behind MAP@R and R-Precision (the first N; k = R searches are deep)")
      ->capture_default_str();
  eval->add_option("--ef-search", e->ef_search, "HNSW efSearch");
  eval->add_option("--nprobe", e->nprobe, "IVF nprobe");
  eval->add_option("--data-dir", e->data_dir, "Fashion-MNIST directory");
  eval->add_flag("--json", e->json, "print JSON");
  OnRun(eval, "dtrain index eval", exit_code, [e] { return Eval(*e); });

  auto dir = std::make_shared<std::string>();
  CLI::App* info = index->add_subcommand("info", "print an index's manifest");
  info->add_option("INDEX", *dir, "index directory")->required();
  OnRun(info, "dtrain index info", exit_code, [dir] { return Info(*dir); });
}

}  // namespace dtrain::cli
