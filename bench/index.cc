// bench/index: the index builder on the Fashion-MNIST train split (60,000
// images) with a trained model, queried with the 10,000 test images.
//
//  1. Embedding throughput: BuildIndex of the default index (HNSW), all cores.
//  2. The gallery's vectors are read back from it; an exact (FLAT) index and
//     HNSW and IVF indexes at several settings are built from them (build
//     time).
//  3. Each index answers the test queries: recall@1 and recall@10 against the
//     exact top-10, queries/s one query at a time on one thread (the online
//     case, with p50/p99 latency) and all queries in one batch (all cores),
//     beside exact search measured in the same run.
//  4. Retrieval quality through the indexes (Precision@1 over all queries,
//     MAP@R over the first --map-queries, k = R = 6,000), beside the same
//     exact search on L2-normalised raw pixels (the baseline).
//
// Goal (issue "Index builder"): HNSW recall@10 >= 0.98 vs exact at >= 10x the
// exact queries/s.
//
//   build/bin/bench_index [--run runs/quickstart] [--queries 10000] [--out FILE]
// The run directory needs a trained model (launch/quickstart.sh makes one).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "bench_util.h"
#include "dtrain/common/logging.h"
#include "dtrain/common/retrieval_metrics.h"
#include "dtrain/indexer/index_eval.h"
#include "dtrain/data/fashion_mnist.h"
#include "dtrain/indexer/index_builder.h"
#include "dtrain/indexer/searcher.h"
#include "dtrain/indexer/vector_index.h"
#include "dtrain/worker/evaluation.h"

namespace fs = std::filesystem;
using dtrain::IndexConfig;
using dtrain::IndexManifest;
using dtrain::Status;
using namespace dtrain::indexer;
using Clock = dtrain::bench::Clock;
using dtrain::bench::Since;

namespace {

void Check(const Status& st, const char* what) { dtrain::bench::CheckOrExit("bench_index", st, what); }

struct Row {
  std::string name;
  double build_s = 0;
  double recall1 = 0, recall10 = 0;
  double p50_ms = 0, p99_ms = 0, single_qps = 0, batch_qps = 0;
};

void Measure(const VectorIndex& index, const std::vector<float>& q, int64_t nq, int64_t timed,
             const std::vector<int64_t>& exact_ids, Row* row) {
  const int dim = index.dim();
  std::vector<float> scores;
  std::vector<int64_t> ids;
  auto b0 = Clock::now();
  Check(index.Search(q.data(), nq, 10, &scores, &ids), "batch search");
  row->batch_qps = nq / Since(b0);
  double r1 = 0, r10 = 0;
  for (int64_t i = 0; i < nq; ++i) {
    std::set<int64_t> truth(exact_ids.begin() + i * 10, exact_ids.begin() + i * 10 + 10);
    r1 += ids[i * 10] == exact_ids[i * 10] ? 1 : 0;
    int hit = 0;
    for (int j = 0; j < 10; ++j) hit += truth.count(ids[i * 10 + j]) ? 1 : 0;
    r10 += hit / 10.0;
  }
  row->recall1 = r1 / nq;
  row->recall10 = r10 / nq;
  std::vector<double> lat;
  const int64_t m = std::min(timed, nq);
  auto t0 = Clock::now();
  for (int64_t i = 0; i < m; ++i) {
    auto a = Clock::now();
    Check(index.Search(q.data() + i * dim, 1, 10, &scores, &ids), "single search");
    lat.push_back(Since(a) * 1e3);
  }
  row->single_qps = m / Since(t0);
  std::sort(lat.begin(), lat.end());
  row->p50_ms = lat[lat.size() / 2];
  row->p99_ms = lat[std::min(lat.size() - 1, static_cast<size_t>(0.99 * lat.size()))];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_index: embedding throughput and FLAT / HNSW / IVF search on Fashion-MNIST", "bench_index"};
  std::string run = "runs/quickstart", out = "bench/results/index.json", work = "/tmp/dtrain_bench_index";
  int64_t nq = 10000, timed = 2000, map_queries = 1000;
  app.add_option("--run", run, "run directory with a trained model")->capture_default_str();
  app.add_option("--queries", nq, "test images used as queries")->capture_default_str();
  app.add_option("--timed", timed, "queries timed one at a time")->capture_default_str();
  app.add_option("--map-queries", map_queries, "queries behind MAP@R")->capture_default_str();
  app.add_option("--work", work, "scratch directory for the index")->capture_default_str();
  app.add_option("--out", out, "JSON output")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  dtrain::LoggingOptions lo;
  lo.level = "warn";
  Check(dtrain::InitLogging(lo), "logging");

  // 1. Embedding throughput, building the default index (HNSW M32 efC200 efS32).
  BuildIndexOptions bo;
  bo.model = run;
  bo.output_dir = work + "/hnsw";
  bo.config.set_kind(IndexConfig::HNSW);
  bo.config.set_hnsw_m(32);
  bo.config.set_hnsw_ef_construction(200);
  bo.config.set_hnsw_ef_search(32);
  bo.config.set_gallery("fashion_mnist:train");
  bo.config.set_embed_batch_size(512);
  bo.progress = false;
  IndexManifest manifest;
  Check(BuildIndex(bo, &manifest), "building the default index");
  std::printf("bench/index: model %s, %s, %u cores\n", manifest.model_source().c_str(),
              manifest.gallery_description().c_str(), std::thread::hardware_concurrency());
  std::printf("embedding: %.0f images/s (%lld images in %.1f s)\n\n", manifest.embed_images_per_sec(),
              static_cast<long long>(manifest.count()), manifest.embed_seconds());
  SearcherOptions so;
  so.index_dir = bo.output_dir;
  std::unique_ptr<Searcher> searcher;
  Check(Searcher::Open(so, &searcher), "opening the default index");
  dtrain::data::FashionMnistOptions fo;
  fo.split = dtrain::data::Split::kTest;
  fo.limit = nq;
  dtrain::data::Dataset test;
  Check(dtrain::data::LoadFashionMnist(fo, &test), "test split");
  nq = test.size;
  std::vector<float> q;
  Check(searcher->Embed(test, &q), "embedding queries");
  std::vector<float> vectors;
  std::vector<int64_t> ids;
  Check(searcher->index().ReconstructAll(&vectors, &ids), "reading vectors");
  const int dim = searcher->index().dim();
  const int64_t n = searcher->index().size();
  // Exact search over the same vectors.
  std::unique_ptr<VectorIndex> exact;
  IndexConfig flat;
  flat.set_kind(IndexConfig::FLAT);
  Check(VectorIndex::Build(flat, dim, vectors.data(), ids.data(), n, &exact), "exact index");

  // 2-3. The indexes.
  std::vector<Row> rows;
  std::vector<float> es;
  std::vector<int64_t> exact_ids;
  Check(exact->Search(q.data(), nq, 10, &es, &exact_ids), "exact search");
  {
    Row r;
    r.name = "FLAT (exact)";
    Measure(*exact, q, nq, timed, exact_ids, &r);
    rows.push_back(r);
  }
  const double exact_single = rows[0].single_qps, exact_batch = rows[0].batch_qps;
  struct Setting {
    IndexConfig::Kind kind;
    int a, b, c;  // HNSW: M, efConstruction, efSearch; IVF: nlist, nprobe
  };
  const std::vector<Setting> settings = {
      {IndexConfig::HNSW, 32, 200, 16},  {IndexConfig::HNSW, 32, 200, 32}, {IndexConfig::HNSW, 32, 200, 64},
      {IndexConfig::HNSW, 32, 200, 128}, {IndexConfig::HNSW, 16, 100, 64}, {IndexConfig::IVF, 256, 4, 0},
      {IndexConfig::IVF, 256, 16, 0},    {IndexConfig::IVF, 256, 32, 0},   {IndexConfig::IVF, 1024, 32, 0},
  };
  std::unique_ptr<VectorIndex> built;
  std::string built_key;
  for (const Setting& s : settings) {
    IndexConfig p;
    p.set_kind(s.kind);
    Row r;
    std::string key;
    if (s.kind == IndexConfig::HNSW) {
      p.set_hnsw_m(s.a);
      p.set_hnsw_ef_construction(s.b);
      p.set_hnsw_ef_search(s.c);
      key = "hnsw" + std::to_string(s.a) + "/" + std::to_string(s.b);
      r.name = "HNSW M" + std::to_string(s.a) + " efC" + std::to_string(s.b) + " efS" + std::to_string(s.c);
    } else {
      p.set_ivf_nlist(s.a);
      p.set_ivf_nprobe(s.b);
      key = "ivf" + std::to_string(s.a);
      r.name = "IVF nlist" + std::to_string(s.a) + " nprobe" + std::to_string(s.b);
    }
    // Search parameters change without a rebuild (save + load with new ones).
    if (key != built_key) {
      auto t0 = Clock::now();
      Check(VectorIndex::Build(p, dim, vectors.data(), ids.data(), n, &built), "build");
      r.build_s = Since(t0);
      built_key = key;
      Check(built->Save(work + "/tmp.faiss"), "save");
    }
    std::unique_ptr<VectorIndex> tuned;
    Check(VectorIndex::Load(work + "/tmp.faiss", p, &tuned), "load");
    Measure(*tuned, q, nq, timed, exact_ids, &r);
    rows.push_back(r);
  }
  // Table.
  std::printf("%-28s %8s %9s %9s %9s %9s %10s %10s %8s %8s\n", "index", "build s", "recall@1", "recall@10",
              "p50 ms", "p99 ms", "qps 1-by-1", "qps batch", "x exact1", "x exactB");
  nlohmann::ordered_json j;
  j["bench"] = "index";
  j["model"] = manifest.model_source();
  j["gallery"] = manifest.gallery_description();
  j["queries"] = nq;
  j["cores"] = std::thread::hardware_concurrency();
  j["embed_images_per_sec"] = manifest.embed_images_per_sec();
  for (const Row& r : rows) {
    std::printf("%-28s %8.1f %9.4f %9.4f %9.3f %9.3f %10.0f %10.0f %8.1f %8.1f\n", r.name.c_str(), r.build_s,
                r.recall1, r.recall10, r.p50_ms, r.p99_ms, r.single_qps, r.batch_qps, r.single_qps / exact_single,
                r.batch_qps / exact_batch);
    nlohmann::ordered_json x;
    x["index"] = r.name;
    x["build_s"] = r.build_s;
    x["recall_at_1_vs_exact"] = r.recall1;
    x["recall_at_10_vs_exact"] = r.recall10;
    x["p50_ms"] = r.p50_ms;
    x["p99_ms"] = r.p99_ms;
    x["single_qps"] = r.single_qps;
    x["batch_qps"] = r.batch_qps;
    x["single_qps_vs_exact"] = r.single_qps / exact_single;
    x["batch_qps_vs_exact"] = r.batch_qps / exact_batch;
    j["rows"].push_back(x);
  }
  // 4. Quality through the default index and exact search (one EvaluateIndex
  // reports both), and the raw-pixel baseline (exact cosine on pixels).
  std::printf("\nretrieval quality, test images against the train gallery (MAP@R over the first %lld queries):\n",
              static_cast<long long>(map_queries));
  std::printf("%-34s %12s %10s\n", "", "Precision@1", "MAP@R");
  {
    IndexEvalOptions eo;
    eo.limit = nq;
    eo.map_queries = map_queries;
    eo.latency_queries = 1;
    IndexEvalReport rep;
    Check(EvaluateIndex(*searcher, eo, &rep), "evaluating");
    std::printf("%-34s %12.4f %10.4f\n", "model, exact (FLAT)", rep.exact_metrics.precision_at_1,
                rep.exact_metrics.map_at_r);
    std::printf("%-34s %12.4f %10.4f\n", "model, HNSW (default settings)", rep.metrics.precision_at_1,
                rep.metrics.map_at_r);
    j["quality"]["model_exact"] = {{"precision_at_1", rep.exact_metrics.precision_at_1},
                                   {"map_at_r", rep.exact_metrics.map_at_r}};
    j["quality"]["model_hnsw"] = {{"precision_at_1", rep.metrics.precision_at_1}, {"map_at_r", rep.metrics.map_at_r}};
  }
  {
    const dtrain::data::Dataset* train = nullptr;
    Check(searcher->Dataset(dtrain::data::Split::kTrain, &train), "train split");
    // The baseline's vectors: L2-normalised pixels, as the trainer's evaluation uses.
    const int px = train->rows * train->cols;
    const torch::Tensor gt = dtrain::worker::RawPixelEmbeddings(*train).contiguous();
    const torch::Tensor qt = dtrain::worker::RawPixelEmbeddings(test).contiguous();
    std::vector<int64_t> gids(static_cast<size_t>(train->size));
    for (int64_t i = 0; i < train->size; ++i) gids[i] = i;
    IndexConfig fp;
    fp.set_kind(IndexConfig::FLAT);
    std::unique_ptr<VectorIndex> rawindex;
    Check(VectorIndex::Build(fp, px, gt.data_ptr<float>(), gids.data(), train->size, &rawindex), "raw-pixel index");
    std::vector<int64_t> glabels(train->labels.begin(), train->labels.end()), qlabels(test.labels.begin(),
                                                                                      test.labels.begin() + nq);
    const int64_t nm = std::min(map_queries, nq);
    std::vector<float> sc;
    std::vector<int64_t> top;
    Check(rawindex->Search(qt.data_ptr<float>(), nq, 10, &sc, &top), "raw search");
    dtrain::NeighborLists lists;
    lists.num_queries = nq;
    lists.k = 10;
    lists.ids = top;
    dtrain::RetrievalMetrics m1, m2;
    Check(dtrain::ComputeRetrievalMetricsPerQuery(lists, qlabels, glabels, std::vector<bool>(nq, false), false, {1},
                                                  &m1),
          "raw metrics");
    std::vector<int64_t> ql(qlabels.begin(), qlabels.begin() + nm);
    const int64_t kr = dtrain::MaxRelevant(ql, glabels, false);
    Check(rawindex->Search(qt.data_ptr<float>(), nm, static_cast<int>(kr), &sc, &top), "raw deep search");
    lists.num_queries = nm;
    lists.k = kr;
    lists.ids = top;
    Check(dtrain::ComputeRetrievalMetricsPerQuery(lists, ql, glabels, std::vector<bool>(nm, false), true, {1}, &m2),
          "raw MAP@R");
    std::printf("%-34s %12.4f %10.4f\n", "raw pixels, exact (baseline)", m1.precision_at_1, m2.map_at_r);
    j["quality"]["raw_pixels_exact"] = {{"precision_at_1", m1.precision_at_1}, {"map_at_r", m2.map_at_r}};
  }
  fs::create_directories(fs::path(out).parent_path());
  std::ofstream(out) << j.dump(2) << "\n";
  std::printf("\nwritten to %s\n", out.c_str());
  fs::remove_all(work);
  return 0;
}
