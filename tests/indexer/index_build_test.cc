// Building, loading and querying indexes from a real (small, untrained) model,
// the coordinator's hand-off, and the dtrain-indexer service on loopback gRPC.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <grpcpp/grpcpp.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include <google/protobuf/text_format.h>
#include <unistd.h>
#include <atomic>

#include "dtrain/common/config.h"
#include "dtrain/common/rpc.h"
#include "dtrain/coordinator/index_handoff.h"
#include "dtrain/data/image_io.h"
#include "dtrain/indexer.grpc.pb.h"
#include "dtrain/indexer/index_builder.h"
#include "dtrain/indexer/index_eval.h"
#include "dtrain/indexer/searcher.h"
#include "dtrain/indexer/service.h"
#include "dtrain/indexer/vector_index.h"
#include "dtrain/models/registry.h"
#include "dtrain/worker/trainer.h"
#include "embedder_run.h"

namespace dtrain::indexer {
namespace {

using data::GrayImage;
using data::WriteGrayPng;

namespace fs = std::filesystem;
using ::testing::HasSubstr;

constexpr int64_t kGallery = 400;

class IndexBuildTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dtrain_idxbuild_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    torch::manual_seed(7);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A run directory as a finished job leaves it: config.textproto + model.pt.
  std::string MakeRun(const std::string& name, int embedding_dim = 16) {
    const fs::path run = dir_ / name;
    config_ = testing::MakeEmbedderRun(run, embedding_dim,
                                       "index { gallery: \"fashion_mnist:test\" gallery_limit: " +
                                           std::to_string(kGallery) + " kind: FLAT }");
    return run.string();
  }

  BuildIndexOptions Options(const std::string& run, IndexConfig::Kind kind) {
    BuildIndexOptions o;
    o.model = run;
    o.output_dir = (fs::path(run) / "index").string();
    o.config = config_.index();
    o.config.set_kind(kind);
    o.config.set_ivf_nlist(16);
    o.config.set_ivf_nprobe(4);
    o.progress = false;
    o.threads = 1;
    return o;
  }

  static QueryRequest DatasetQueries(int n, int k) {
    QueryRequest req;
    req.set_k(k);
    for (int i = 0; i < n; ++i) {
      QueryImage* q = req.add_queries();
      q->mutable_dataset()->set_split("test");
      q->mutable_dataset()->set_index(i);
    }
    return req;
  }

  static std::unique_ptr<Searcher> Open(const std::string& index_dir, const std::string& model = "") {
    SearcherOptions so;
    so.index_dir = index_dir;
    so.model = model;
    so.threads = 1;
    std::unique_ptr<Searcher> s;
    Status st = Searcher::Open(so, &s);
    EXPECT_TRUE(st.ok()) << st;
    return s;
  }

  fs::path dir_;
  JobConfig config_;
};

TEST_F(IndexBuildTest, ExactIndexMatchesBruteForceAndMetadataRoundTrips) {
  const std::string run = MakeRun("exact");
  IndexManifest m;
  ASSERT_TRUE(BuildIndex(Options(run, IndexConfig::FLAT), &m).ok());
  EXPECT_EQ(m.count(), kGallery);
  EXPECT_EQ(m.labelled(), kGallery);
  EXPECT_EQ(m.embedding_dim(), 16);
  EXPECT_EQ(m.job_name(), "exact");
  EXPECT_EQ(m.label_names_size(), 10);
  auto searcher = Open(run + "/index");
  // Brute force over the gallery's embeddings, computed independently.
  const data::Dataset* test = nullptr;
  ASSERT_TRUE(searcher->Dataset(data::Split::kTest, &test).ok());
  data::Dataset gallery = *test;
  gallery.size = kGallery;
  gallery.images.resize(static_cast<size_t>(kGallery) * 28 * 28);
  gallery.labels.resize(kGallery);
  std::vector<float> emb;
  ASSERT_TRUE(searcher->Embed(gallery, &emb).ok());
  const int k = 5;
  QueryReply reply;
  ASSERT_TRUE(searcher->Query(DatasetQueries(8, k), &reply).ok());
  ASSERT_EQ(reply.results_size(), 8);
  for (int qi = 0; qi < 8; ++qi) {
    std::vector<std::pair<float, int64_t>> all;
    for (int64_t j = 0; j < kGallery; ++j) {
      float dot = 0;
      for (int d = 0; d < 16; ++d) dot += emb[qi * 16 + d] * emb[j * 16 + d];
      all.emplace_back(dot, j);
    }
    std::stable_sort(all.begin(), all.end(), [](auto& a, auto& b) { return a.first > b.first; });
    const QueryResult& r = reply.results(qi);
    EXPECT_EQ(r.query_label(), test->labels[qi]);
    ASSERT_EQ(r.neighbors_size(), k);
    // The query is in the gallery: it finds itself first.
    EXPECT_EQ(r.neighbors(0).id(), qi);
    for (int j = 0; j < k; ++j) {
      EXPECT_NEAR(r.neighbors(j).score(), all[j].first, 1e-4) << "query " << qi << " rank " << j;
      const ItemMeta& meta = r.neighbors(j).meta();
      EXPECT_EQ(meta.id(), r.neighbors(j).id());
      EXPECT_EQ(meta.dataset_index(), r.neighbors(j).id());
      EXPECT_EQ(meta.label(), test->labels[static_cast<size_t>(meta.dataset_index())]);
      EXPECT_EQ(meta.source(), "fashion_mnist:test");
    }
  }
  // A query by PNG file (the image of test[3]) and by raw pixels give the
  // dataset query's answer.
  GrayImage img;
  img.rows = img.cols = 28;
  img.pixels.assign(test->image(3), test->image(3) + 28 * 28);
  ASSERT_TRUE(WriteGrayPng((dir_ / "q.png").string(), img).ok());
  std::ifstream in(dir_ / "q.png", std::ios::binary);
  std::string png((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  QueryRequest by_file;
  by_file.set_k(k);
  by_file.add_queries()->set_image_file(png);
  QueryImage* raw = by_file.add_queries();
  raw->mutable_pixels()->set_rows(28);
  raw->mutable_pixels()->set_cols(28);
  raw->mutable_pixels()->set_pixels(std::string(img.pixels.begin(), img.pixels.end()));
  QueryReply file_reply;
  ASSERT_TRUE(searcher->Query(by_file, &file_reply).ok());
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(file_reply.results(r).query_label(), -1);
    for (int j = 0; j < k; ++j) {
      EXPECT_EQ(file_reply.results(r).neighbors(j).id(), reply.results(3).neighbors(j).id());
    }
  }
}

TEST_F(IndexBuildTest, EveryKindBuildsSavesLoadsAndAnswersTheSame) {
  const std::string run = MakeRun("kinds");
  for (IndexConfig::Kind kind : {IndexConfig::FLAT, IndexConfig::HNSW, IndexConfig::IVF}) {
    SCOPED_TRACE(IndexKindName(kind));
    BuildIndexOptions o = Options(run, kind);
    o.output_dir = run + "/index_" + IndexKindName(kind);
    IndexManifest m;
    ASSERT_TRUE(BuildIndex(o, &m).ok());
    EXPECT_EQ(m.params().kind(), kind);
    EXPECT_FALSE(fs::exists(o.output_dir + ".building-" + std::to_string(::getpid())));
    QueryReply a, b;
    ASSERT_TRUE(Open(o.output_dir)->Query(DatasetQueries(5, 10), &a).ok());
    ASSERT_TRUE(Open(o.output_dir)->Query(DatasetQueries(5, 10), &b).ok());
    EXPECT_EQ(a.results(0).neighbors_size(), 10);
    for (int i = 0; i < 5; ++i) {
      for (int j = 0; j < a.results(i).neighbors_size(); ++j) {
        EXPECT_EQ(a.results(i).neighbors(j).id(), b.results(i).neighbors(j).id());
        EXPECT_EQ(a.results(i).neighbors(j).score(), b.results(i).neighbors(j).score());
      }
    }
    // Evaluation through the index: exact recall for FLAT, high for the others.
    IndexEvalOptions eo;
    eo.limit = 200;
    eo.latency_queries = 20;
    IndexEvalReport r;
    auto s = Open(o.output_dir);
    Status est = EvaluateIndex(*s, eo, &r);
    ASSERT_TRUE(est.ok()) << est;
    EXPECT_TRUE(r.leave_one_out);
    ASSERT_EQ(r.recall_vs_exact.size(), 2u);
    EXPECT_GE(r.recall_vs_exact[1].second, kind == IndexConfig::FLAT ? 1.0 : 0.8);
    if (kind == IndexConfig::FLAT) {
      EXPECT_DOUBLE_EQ(r.metrics.precision_at_1, r.exact_metrics.precision_at_1);
      EXPECT_DOUBLE_EQ(r.metrics.map_at_r, r.exact_metrics.map_at_r);
    }
    EXPECT_GT(r.metrics.precision_at_1, 0.1);  // better than chance even untrained
    EXPECT_GT(r.speed.single_qps, 0);
    EXPECT_THAT(IndexEvalJson(r), HasSubstr("recall_vs_exact"));
  }
}

TEST_F(IndexBuildTest, BadInputsGiveClearErrorsAndLeaveTheOldIndex) {
  const std::string run = MakeRun("bad");
  BuildIndexOptions o = Options(run, IndexConfig::FLAT);
  IndexManifest first;
  ASSERT_TRUE(BuildIndex(o, &first).ok());
  // A missing model.
  BuildIndexOptions missing = o;
  missing.model = run + "/nope.pt";
  EXPECT_EQ(BuildIndex(missing, nullptr).code(), Status::Code::kNotFound);
  // A gallery with a colour image: refused, naming it; the old index stays.
  const fs::path gal = dir_ / "gallery";
  GrayImage g;
  g.rows = g.cols = 28;
  g.pixels.assign(28 * 28, 9);
  ASSERT_TRUE(WriteGrayPng((gal / "a.png").string(), g).ok());
  std::ofstream(gal / "b.png", std::ios::binary) << "\x89PNG\r\n\x1a\ngarbage";
  BuildIndexOptions bad = o;
  bad.config.set_gallery(gal.string());
  Status st = BuildIndex(bad, nullptr);
  EXPECT_EQ(st.code(), Status::Code::kCorruption);
  EXPECT_THAT(st.message(), HasSubstr("b.png"));
  IndexManifest still;
  ASSERT_TRUE(ReadIndexManifest(o.output_dir, &still).ok());
  EXPECT_EQ(still.SerializeAsString(), first.SerializeAsString());
  // Images of the wrong size for the model.
  fs::remove(gal / "b.png");
  fs::remove(gal / "a.png");
  g.rows = g.cols = 32;
  g.pixels.assign(32 * 32, 9);
  ASSERT_TRUE(WriteGrayPng((gal / "big.png").string(), g).ok());
  st = BuildIndex(bad, nullptr);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("28x28"));
  // An empty gallery directory.
  fs::remove(gal / "big.png");
  EXPECT_EQ(BuildIndex(bad, nullptr).code(), Status::Code::kFailedPrecondition);
  // An output directory that is something else.
  fs::create_directories(dir_ / "photos");
  std::ofstream(dir_ / "photos" / "keep.txt") << "mine";
  BuildIndexOptions elsewhere = o;
  elsewhere.output_dir = (dir_ / "photos").string();
  EXPECT_EQ(BuildIndex(elsewhere, nullptr).code(), Status::Code::kFailedPrecondition);
  EXPECT_TRUE(fs::exists(dir_ / "photos" / "keep.txt"));
  // No leftovers beside the index.
  for (const auto& e : fs::directory_iterator(run)) {
    EXPECT_EQ(e.path().filename().string().find(".building-"), std::string::npos) << e.path();
  }
  // A model of another embedding size cannot query the index.
  const std::string other = MakeRun("other", 32);
  SearcherOptions so;
  so.index_dir = o.output_dir;
  so.model = other + "/model.pt";
  std::unique_ptr<Searcher> s;
  st = Searcher::Open(so, &s);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("32-dimensional"));
  // A query image of the wrong size; k out of range; an index past the split.
  auto searcher = Open(o.output_dir);
  QueryRequest req;
  req.set_k(3);
  QueryImage* q = req.add_queries();
  q->mutable_pixels()->set_rows(10);
  q->mutable_pixels()->set_cols(10);
  q->mutable_pixels()->set_pixels(std::string(100, '\0'));
  QueryReply reply;
  st = searcher->Query(req, &reply);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("10x10"));
  EXPECT_EQ(searcher->Query(DatasetQueries(1, 0), &reply).code(), Status::Code::kInvalidArgument);
  QueryRequest past = DatasetQueries(1, 3);
  past.mutable_queries(0)->mutable_dataset()->set_index(10000);
  EXPECT_EQ(searcher->Query(past, &reply).code(), Status::Code::kInvalidArgument);
  // A damaged model copy is caught by its digest; a directory without a
  // manifest (an unfinished build) is not an index.
  std::ofstream(o.output_dir + "/model.pt", std::ios::app) << "x";
  so = SearcherOptions();
  so.index_dir = o.output_dir;
  st = Searcher::Open(so, &s);
  EXPECT_EQ(st.code(), Status::Code::kCorruption);
  fs::remove(o.output_dir + "/manifest.textproto");
  EXPECT_EQ(Searcher::Open(so, &s).code(), Status::Code::kNotFound);
}

TEST_F(IndexBuildTest, HandOffBuildsTheIndexOfACompletedJob) {
  const std::string run = MakeRun("handoff");
  JobConfig config = config_;
  config.mutable_index()->set_kind(IndexConfig::HNSW);
  std::unique_ptr<IndexBuilder> builder;
  ASSERT_TRUE(coordinator::MakeIndexBuilder(config, false, &builder).ok());
  EXPECT_EQ(builder->Name(), "in-process");
  IndexManifest m;
  ASSERT_TRUE(coordinator::HandOffToIndexer(config, *builder, &m).ok());
  EXPECT_TRUE(IsIndexDir(run + "/index"));
  EXPECT_EQ(m.job_name(), "handoff");
  EXPECT_EQ(m.params().kind(), IndexConfig::HNSW);
  // A remote builder without a token is refused up front.
  config.mutable_index()->set_builder_address("127.0.0.1:1");
  ::unsetenv("DTRAIN_JOB_TOKEN");
  EXPECT_EQ(coordinator::MakeIndexBuilder(config, false, &builder).code(), Status::Code::kNotFound);
}

TEST_F(IndexBuildTest, ServiceBuildsAndServesOnlyWithTheToken) {
  const std::string run = MakeRun("service");
  IndexerServerOptions so;
  so.token = "secret-token";
  so.threads = 1;
  std::unique_ptr<IndexerServer> server;
  ASSERT_TRUE(IndexerServer::Start(so, &server).ok());
  const std::string address = "127.0.0.1:" + std::to_string(server->port());
  auto stub = dtrain::IndexBuilder::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  auto call_info = [&](const std::string* token, IndexInfo* info) {
    grpc::ClientContext ctx;
    if (token) rpc::AttachJobToken(&ctx, *token);
    return stub->Info(&ctx, InfoRequest(), info);
  };
  // Unauthenticated calls: rejected, nothing built or loaded.
  const std::string wrong = "wrong-token";
  BuildIndexRequest req = coordinator::HandoffRequest(config_);
  {
    grpc::ClientContext ctx;
    rpc::AttachJobToken(&ctx, wrong);
    BuildIndexReply reply;
    EXPECT_EQ(stub->Build(&ctx, req, &reply).error_code(), grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext ctx2;
    EXPECT_EQ(stub->Build(&ctx2, req, &reply).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  EXPECT_FALSE(fs::exists(run + "/index"));
  IndexInfo info;
  EXPECT_EQ(call_info(nullptr, &info).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  ASSERT_TRUE(call_info(&so.token, &info).ok());
  EXPECT_FALSE(info.loaded());
  // Build through the remote builder (the coordinator's path), then query.
  auto builder = NewRemoteIndexBuilder(address, so.token);
  BuildIndexReply built;
  ASSERT_TRUE(builder->Build(req, &built).ok());
  EXPECT_EQ(built.manifest().count(), kGallery);
  ASSERT_TRUE(call_info(&so.token, &info).ok());
  EXPECT_TRUE(info.loaded());
  QueryReply local;
  ASSERT_TRUE(Open(run + "/index")->Query(DatasetQueries(4, 5), &local).ok());
  // Concurrent queries all get the in-process answer.
  std::vector<std::thread> threads;
  std::atomic<int> same{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      grpc::ClientContext ctx;
      rpc::AttachJobToken(&ctx, so.token);
      QueryReply remote;
      if (stub->Query(&ctx, DatasetQueries(4, 5), &remote).ok() &&
          remote.SerializeAsString().size() > 0) {
        bool eq = remote.results_size() == local.results_size();
        for (int i = 0; eq && i < local.results_size(); ++i) {
          for (int j = 0; j < 5; ++j) eq = eq && remote.results(i).neighbors(j).id() == local.results(i).neighbors(j).id();
        }
        if (eq) ++same;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(same.load(), 4);
  // A malformed query: INVALID_ARGUMENT, and the served count is unchanged.
  ASSERT_TRUE(call_info(&so.token, &info).ok());
  const int64_t served = info.queries_served();
  EXPECT_EQ(served, 16);
  {
    grpc::ClientContext ctx;
    rpc::AttachJobToken(&ctx, so.token);
    QueryReply r;
    EXPECT_EQ(stub->Query(&ctx, DatasetQueries(2, 5000), &r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    grpc::ClientContext ctx2;
    rpc::AttachJobToken(&ctx2, wrong);
    EXPECT_EQ(stub->Query(&ctx2, DatasetQueries(2, 5), &r).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  ASSERT_TRUE(call_info(&so.token, &info).ok());
  EXPECT_EQ(info.queries_served(), served);
  // Loading a directory that is not an index keeps the served one.
  {
    grpc::ClientContext ctx;
    rpc::AttachJobToken(&ctx, so.token);
    LoadIndexRequest lr;
    lr.set_index_dir(dir_.string());
    IndexInfo after;
    EXPECT_EQ(stub->Load(&ctx, lr, &after).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  ASSERT_TRUE(call_info(&so.token, &info).ok());
  EXPECT_TRUE(info.loaded());
  EXPECT_EQ(info.index_dir(), req.output_dir());
  server->Shutdown();
}

}  // namespace
}  // namespace dtrain::indexer
