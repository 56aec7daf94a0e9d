// Evaluating an index: how close the approximate kinds come to exact search,
// retrieval quality through the index, and search speed.
//
// With Q queries (embedded once) against the index's gallery:
//  - recall@K vs exact: |top-K of the index ∩ exact top-K| / K, averaged
//    (exact = a FLAT index over the same vectors, read back from the index);
//  - Precision@1, MAP@R, Recall@K of the index's own ranking
//    (common/retrieval_metrics.h); MAP@R searches k = R (the largest number
//    of relevant gallery items; HNSW's efSearch is raised to k for that
//    search, IVF keeps its nprobe), so an index that cannot return that many
//    pays for it. When the queries come from the gallery's own source (the
//    same split or directory), a query whose item is in the index has it left
//    out of its results, and R does not count it;
//  - latency: queries one at a time on one thread (p50/p99 in ms, and
//    queries/s), and all queries in one batch (queries/s, all cores), for the
//    index and for exact search in the same run.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "dtrain/common/retrieval_metrics.h"
#include "dtrain/common/status.h"

namespace dtrain::indexer {

class Searcher;

struct IndexEvalOptions {
  // Query set: a gallery spec (gallery.h); labelled queries are needed for
  // the retrieval metrics.
  std::string queries = "fashion_mnist:test";
  // First N queries only (0 = all).
  int64_t limit = 0;
  // Compute MAP@R and R-Precision (searches k = R per query: with the train
  // split as gallery R = 6,000, and HNSW visits far more of the graph) over
  // the first map_queries queries; Precision@1 and Recall@K use them all.
  bool map_at_r = true;
  int64_t map_queries = 1000;
  // Queries timed one at a time for the latency figures.
  int64_t latency_queries = 1000;
  std::vector<int> recall_ks = {1, 10};
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
};

struct SpeedFigures {
  double p50_ms = 0;
  double p99_ms = 0;
  double single_qps = 0;  // one query at a time, one thread
  double batch_qps = 0;   // all queries in one call
};

struct IndexEvalReport {
  std::string index_description;  // VectorIndex::Describe()
  std::string queries;            // the query set's description
  int64_t num_queries = 0;
  int64_t map_queries = 0;  // queries behind MAP@R and R-Precision (0: not computed)
  bool leave_one_out = false;
  std::vector<std::pair<int, double>> recall_vs_exact;  // (K, recall)
  RetrievalMetrics metrics;        // through the index
  RetrievalMetrics exact_metrics;  // through exact search
  SpeedFigures speed;
  SpeedFigures exact_speed;
  double embed_seconds = 0;
};

Status EvaluateIndex(const Searcher& searcher, const IndexEvalOptions& options, IndexEvalReport* report);

// The report as a table, and as JSON.
std::string IndexEvalTable(const IndexEvalReport& report);
std::string IndexEvalJson(const IndexEvalReport& report);

}  // namespace dtrain::indexer
