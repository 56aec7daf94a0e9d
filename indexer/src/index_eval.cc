#include "dtrain/indexer/index_eval.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <unordered_map>
#include <unordered_set>

#include "dtrain/indexer/gallery.h"
#include "dtrain/indexer/searcher.h"
#include "dtrain/indexer/vector_index.h"

namespace dtrain::indexer {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// Searches k (+1 when leaving the query out) and drops each query's own id.
// With `deep`, HNSW's efSearch is raised to k for this search (MAP@R asks
// for k = R results, far more than efSearch).
Status SearchLeaveOut(const VectorIndex& index, const std::vector<float>& q, int64_t n, int k,
                      const std::vector<int64_t>* own_ids, std::vector<int64_t>* ids, bool deep = false) {
  const int kk = own_ids ? k + 1 : k;
  std::vector<float> scores;
  std::vector<int64_t> raw;
  DTRAIN_RETURN_IF_ERROR(index.Search(q.data(), n, kk, &scores, &raw, deep ? kk : 0));
  ids->assign(static_cast<size_t>(n) * k, -1);
  for (int64_t i = 0; i < n; ++i) {
    int out = 0;
    for (int j = 0; j < kk && out < k; ++j) {
      const int64_t id = raw[static_cast<size_t>(i * kk + j)];
      if (own_ids && id == (*own_ids)[static_cast<size_t>(i)]) continue;
      (*ids)[static_cast<size_t>(i * k + out++)] = id;
    }
  }
  return Status::OK();
}

Status MeasureSpeed(const VectorIndex& index, const std::vector<float>& q, int64_t n, int64_t timed, int k,
                    SpeedFigures* out) {
  const int dim = index.dim();
  std::vector<float> scores;
  std::vector<int64_t> ids;
  std::vector<double> lat;
  const int64_t m = std::min(timed, n);
  lat.reserve(static_cast<size_t>(m));
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < m; ++i) {
    const auto a = Clock::now();
    DTRAIN_RETURN_IF_ERROR(index.Search(q.data() + i * dim, 1, k, &scores, &ids));
    lat.push_back(Seconds(a, Clock::now()) * 1e3);
  }
  const double single_s = Seconds(t0, Clock::now());
  std::sort(lat.begin(), lat.end());
  auto pct = [&](double p) {
    if (lat.empty()) return 0.0;
    return lat[std::min(lat.size() - 1, static_cast<size_t>(p * static_cast<double>(lat.size())))];
  };
  out->p50_ms = pct(0.50);
  out->p99_ms = pct(0.99);
  out->single_qps = m / std::max(single_s, 1e-12);
  const auto b0 = Clock::now();
  DTRAIN_RETURN_IF_ERROR(index.Search(q.data(), n, k, &scores, &ids));
  out->batch_qps = n / std::max(Seconds(b0, Clock::now()), 1e-12);
  return Status::OK();
}

}  // namespace

Status EvaluateIndex(const Searcher& searcher, const IndexEvalOptions& o, IndexEvalReport* report) {
  IndexEvalReport r;
  const VectorIndex& index = searcher.index();
  r.index_description = index.Describe();
  // Queries.
  GalleryOptions go;
  go.spec = o.queries;
  go.limit = o.limit;
  go.data_dir = o.data_dir;
  Gallery queries;
  DTRAIN_RETURN_IF_ERROR(LoadGallery(go, &queries));
  r.queries = queries.description;
  const int64_t n = queries.images.size;
  r.num_queries = n;
  const auto e0 = Clock::now();
  std::vector<float> q;
  DTRAIN_RETURN_IF_ERROR(searcher.Embed(queries.images, &q));
  r.embed_seconds = Seconds(e0, Clock::now());
  // The gallery's vectors and labels, and exact search over them.
  std::vector<float> vectors;
  std::vector<int64_t> gallery_ids;
  DTRAIN_RETURN_IF_ERROR(index.ReconstructAll(&vectors, &gallery_ids));
  std::unique_ptr<VectorIndex> exact;
  IndexConfig flat;
  flat.set_kind(IndexConfig::FLAT);
  DTRAIN_RETURN_IF_ERROR(
      VectorIndex::Build(flat, index.dim(), vectors.data(), gallery_ids.data(), index.size(), &exact));
  std::unordered_map<int64_t, int64_t> position;
  std::vector<int64_t> gallery_labels(gallery_ids.size(), -1);
  for (size_t i = 0; i < gallery_ids.size(); ++i) {
    position[gallery_ids[i]] = static_cast<int64_t>(i);
    ItemMeta meta;
    DTRAIN_RETURN_IF_ERROR(searcher.Lookup(gallery_ids[i], &meta));
    gallery_labels[i] = meta.label();
  }
  // Leave-one-out when the queries are the gallery's own split.
  const std::string gallery_spec = searcher.manifest().params().gallery();
  data::Split qs, gs;
  const bool q_dataset = ParseDatasetSpec(o.queries, &qs), g_dataset = ParseDatasetSpec(gallery_spec, &gs);
  r.leave_one_out = q_dataset && g_dataset ? qs == gs : (!q_dataset && !g_dataset && o.queries == gallery_spec);
  std::vector<int64_t> own_ids;
  for (const ItemMeta& m : queries.items) own_ids.push_back(m.id());
  const std::vector<int64_t>* own = r.leave_one_out ? &own_ids : nullptr;
  std::vector<int64_t> query_labels;
  for (const ItemMeta& m : queries.items) query_labels.push_back(m.label());
  // Recall vs exact at the largest K.
  const int kmax = *std::max_element(o.recall_ks.begin(), o.recall_ks.end());
  std::vector<int64_t> approx_ids, exact_ids;
  DTRAIN_RETURN_IF_ERROR(SearchLeaveOut(index, q, n, kmax, own, &approx_ids));
  DTRAIN_RETURN_IF_ERROR(SearchLeaveOut(*exact, q, n, kmax, own, &exact_ids));
  for (int K : o.recall_ks) {
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      std::unordered_set<int64_t> truth(exact_ids.begin() + i * kmax, exact_ids.begin() + i * kmax + K);
      int hit = 0;
      for (int j = 0; j < K; ++j) hit += truth.count(approx_ids[static_cast<size_t>(i * kmax + j)]) ? 1 : 0;
      sum += static_cast<double>(hit) / K;
    }
    r.recall_vs_exact.emplace_back(K, n ? sum / n : 0.0);
  }
  // Retrieval metrics through the index (and exact search, for reference).
  // A query whose own item is in the gallery has it left out (and R excludes it).
  std::vector<bool> self(static_cast<size_t>(n), false);
  if (own) {
    for (int64_t i = 0; i < n; ++i) self[static_cast<size_t>(i)] = position.count(own_ids[static_cast<size_t>(i)]) > 0;
  }
  // Precision@1 and Recall@K over every query (a k = max K search); the
  // R-based figures over the first map_queries (a k = R search, much deeper).
  auto metrics = [&](const VectorIndex& idx, int64_t nm, bool r_metrics, RetrievalMetrics* out) -> Status {
    const std::vector<int64_t> labels(query_labels.begin(), query_labels.begin() + nm);
    const std::vector<bool> selfs(self.begin(), self.begin() + nm);
    int64_t k = kmax;
    if (r_metrics) k = std::max<int64_t>(kmax, MaxRelevant(labels, gallery_labels, selfs));
    k = std::min<int64_t>(k, index.size());
    std::vector<int64_t> ids;
    DTRAIN_RETURN_IF_ERROR(SearchLeaveOut(idx, q, nm, static_cast<int>(k), own, &ids, r_metrics));
    NeighborLists lists;
    lists.num_queries = nm;
    lists.k = k;
    lists.ids.resize(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      auto it = position.find(ids[i]);
      lists.ids[i] = it == position.end() ? -1 : it->second;
    }
    return ComputeRetrievalMetricsPerQuery(lists, labels, gallery_labels, selfs, r_metrics, o.recall_ks, out);
  };
  const int64_t nm = o.map_at_r ? std::min<int64_t>(n, std::max<int64_t>(o.map_queries, 0)) : 0;
  r.map_queries = nm;
  using Job = std::pair<const VectorIndex*, RetrievalMetrics*>;
  for (auto [idx, out] : {Job(&index, &r.metrics), Job(exact.get(), &r.exact_metrics)}) {
    DTRAIN_RETURN_IF_ERROR(metrics(*idx, n, false, out));
    if (nm > 0) {
      RetrievalMetrics deep;
      DTRAIN_RETURN_IF_ERROR(metrics(*idx, nm, true, &deep));
      out->map_at_r = deep.map_at_r;
      out->r_precision = deep.r_precision;
    }
  }
  // Speed.
  DTRAIN_RETURN_IF_ERROR(MeasureSpeed(index, q, n, o.latency_queries, kmax, &r.speed));
  DTRAIN_RETURN_IF_ERROR(MeasureSpeed(*exact, q, n, o.latency_queries, kmax, &r.exact_speed));
  *report = std::move(r);
  return Status::OK();
}

std::string IndexEvalTable(const IndexEvalReport& r) {
  std::string out;
  char buf[256];
  std::snprintf(buf, sizeof buf, "index   %s\nqueries %s%s\n\n", r.index_description.c_str(), r.queries.c_str(),
                r.leave_one_out ? " (each query's own item left out)" : "");
  out += buf;
  std::snprintf(buf, sizeof buf, "%-22s %12s %12s\n", "", "index", "exact");
  out += buf;
  for (const auto& [k, v] : r.recall_vs_exact) {
    std::snprintf(buf, sizeof buf, "%-22s %12.4f %12s\n", ("recall@" + std::to_string(k) + " vs exact").c_str(), v, "1");
    out += buf;
  }
  auto row = [&](const char* name, double a, double b, const char* fmt) {
    char line[128];
    char fa[32], fb[32];
    std::snprintf(fa, sizeof fa, fmt, a);
    std::snprintf(fb, sizeof fb, fmt, b);
    std::snprintf(line, sizeof line, "%-22s %12s %12s\n", name, fa, fb);
    out += line;
  };
  row("Precision@1", r.metrics.precision_at_1, r.exact_metrics.precision_at_1, "%.4f");
  if (r.map_queries > 0) {
    const std::string label = "MAP@R" + (r.map_queries < r.num_queries ? " (" + std::to_string(r.map_queries) + " q)" : "");
    row(label.c_str(), r.metrics.map_at_r, r.exact_metrics.map_at_r, "%.4f");
  }
  for (size_t i = 0; i < r.metrics.recall_at.size() && i < r.exact_metrics.recall_at.size(); ++i) {
    row(("Recall@" + std::to_string(r.metrics.recall_at[i].first)).c_str(), r.metrics.recall_at[i].second,
        r.exact_metrics.recall_at[i].second, "%.4f");
  }
  row("latency p50 (ms)", r.speed.p50_ms, r.exact_speed.p50_ms, "%.3f");
  row("latency p99 (ms)", r.speed.p99_ms, r.exact_speed.p99_ms, "%.3f");
  row("queries/s, one by one", r.speed.single_qps, r.exact_speed.single_qps, "%.0f");
  row("queries/s, batched", r.speed.batch_qps, r.exact_speed.batch_qps, "%.0f");
  std::snprintf(buf, sizeof buf, "speed-up over exact: %.1fx one by one, %.1fx batched\n",
                r.speed.single_qps / std::max(r.exact_speed.single_qps, 1e-12),
                r.speed.batch_qps / std::max(r.exact_speed.batch_qps, 1e-12));
  out += buf;
  return out;
}

std::string IndexEvalJson(const IndexEvalReport& r) {
  nlohmann::ordered_json j;
  j["index"] = r.index_description;
  j["queries"] = r.queries;
  j["num_queries"] = r.num_queries;
  j["leave_one_out"] = r.leave_one_out;
  j["map_queries"] = r.map_queries;
  for (const auto& [k, v] : r.recall_vs_exact) j["recall_vs_exact"]["@" + std::to_string(k)] = v;
  auto metrics = [](const RetrievalMetrics& m) {
    nlohmann::ordered_json x;
    x["queries"] = m.queries;
    x["precision_at_1"] = m.precision_at_1;
    x["map_at_r"] = m.map_at_r;
    x["r_precision"] = m.r_precision;
    for (const auto& [k, v] : m.recall_at) x["recall_at"][std::to_string(k)] = v;
    return x;
  };
  auto speed = [](const SpeedFigures& s) {
    nlohmann::ordered_json x;
    x["p50_ms"] = s.p50_ms;
    x["p99_ms"] = s.p99_ms;
    x["single_qps"] = s.single_qps;
    x["batch_qps"] = s.batch_qps;
    return x;
  };
  j["index_metrics"] = metrics(r.metrics);
  j["exact_metrics"] = metrics(r.exact_metrics);
  j["index_speed"] = speed(r.speed);
  j["exact_speed"] = speed(r.exact_speed);
  j["embed_seconds"] = r.embed_seconds;
  return j.dump(2) + "\n";
}

}  // namespace dtrain::indexer
