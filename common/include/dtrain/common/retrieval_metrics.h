// Retrieval quality from ranked neighbour lists.
//
// Definitions follow Musgrave, Belongie and Lim, "A Metric Learning Reality
// Check" (ECCV 2020). For a query q of class y, R is the number of reference
// items of class y other than q itself. With the neighbours of q sorted by
// decreasing similarity (q itself excluded):
//   Precision@1  = 1 if the first neighbour has class y, else 0;
//   R-Precision  = (items of class y among the first R) / R;
//   MAP@R        = (1/R) * sum_{i=1..R} P(i) * rel(i), where rel(i) is 1 when
//                  the i-th neighbour has class y and P(i) is the precision of
//                  the first i neighbours;
//   Recall@K     = 1 if any of the first K neighbours has class y (the
//                  convention of deep metric learning papers).
// Each is averaged over the queries; queries with R = 0 are skipped.
//
// Pure C++: the neighbour search (exact, or through an index) is the caller's.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "dtrain/common/status.h"

namespace dtrain {

struct RetrievalMetrics {
  int64_t queries = 0;  // queries with R >= 1
  double precision_at_1 = 0;
  double r_precision = 0;
  double map_at_r = 0;
  std::vector<std::pair<int, double>> recall_at;  // (K, Recall@K)
};

struct NeighborLists {
  // Row-major [num_queries x k] reference indices, best first, the query itself
  // excluded. Entries < 0 mean "no neighbour" (an index returned fewer).
  std::vector<int64_t> ids;
  int64_t num_queries = 0;
  int64_t k = 0;
};

// `reference_labels` are the classes of the reference (gallery) items;
// `query_labels` those of the queries. When `queries_in_reference` is true
// the queries are the reference set itself (leave-one-out), so R excludes the
// query. InvalidArgument when k is smaller than some query's R or than a
// requested K.
Status ComputeRetrievalMetrics(const NeighborLists& neighbors, const std::vector<int64_t>& query_labels,
                               const std::vector<int64_t>& reference_labels, bool queries_in_reference,
                               const std::vector<int>& recall_ks, RetrievalMetrics* out);

// The general form, for queries that are only partly in the reference set
// (e.g. the first 1,000 test images against an index of the test split):
// query q's own item is in the reference set, and already left out of its
// neighbour list, exactly when self_in_reference[q] (R then excludes it).
// With `with_r_metrics` false, R-Precision and MAP@R are left at 0 and k may
// be smaller than R (for Precision@1 and Recall@K from a short search).
Status ComputeRetrievalMetricsPerQuery(const NeighborLists& neighbors, const std::vector<int64_t>& query_labels,
                                       const std::vector<int64_t>& reference_labels,
                                       const std::vector<bool>& self_in_reference, bool with_r_metrics,
                                       const std::vector<int>& recall_ks, RetrievalMetrics* out);

// Largest R over the queries: the k a neighbour search must return.
int64_t MaxRelevant(const std::vector<int64_t>& query_labels, const std::vector<int64_t>& reference_labels,
                    bool queries_in_reference);
int64_t MaxRelevant(const std::vector<int64_t>& query_labels, const std::vector<int64_t>& reference_labels,
                    const std::vector<bool>& self_in_reference);

// "P@1 0.9123  R-P 0.8012  MAP@R 0.7841  R@1 0.9123  R@5 ..." for logs.
std::string FormatRetrievalMetrics(const RetrievalMetrics& m);

}  // namespace dtrain
