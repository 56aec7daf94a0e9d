#include "dtrain/common/retrieval_metrics.h"

#include <algorithm>
#include <cstdio>
#include <unordered_map>

namespace dtrain {
namespace {

std::unordered_map<int64_t, int64_t> CountLabels(const std::vector<int64_t>& labels) {
  std::unordered_map<int64_t, int64_t> counts;
  for (int64_t l : labels) ++counts[l];
  return counts;
}

int64_t RelevantCount(const std::unordered_map<int64_t, int64_t>& counts, int64_t label, bool queries_in_reference) {
  auto it = counts.find(label);
  const int64_t n = it == counts.end() ? 0 : it->second;
  return queries_in_reference ? n - 1 : n;
}

}  // namespace

int64_t MaxRelevant(const std::vector<int64_t>& query_labels, const std::vector<int64_t>& reference_labels,
                    bool queries_in_reference) {
  return MaxRelevant(query_labels, reference_labels, std::vector<bool>(query_labels.size(), queries_in_reference));
}

int64_t MaxRelevant(const std::vector<int64_t>& query_labels, const std::vector<int64_t>& reference_labels,
                    const std::vector<bool>& self_in_reference) {
  const auto counts = CountLabels(reference_labels);
  int64_t r = 0;
  for (size_t q = 0; q < query_labels.size(); ++q) {
    const bool self = q < self_in_reference.size() && self_in_reference[q];
    r = std::max(r, RelevantCount(counts, query_labels[q], self));
  }
  return r;
}

Status ComputeRetrievalMetrics(const NeighborLists& neighbors, const std::vector<int64_t>& query_labels,
                               const std::vector<int64_t>& reference_labels, bool queries_in_reference,
                               const std::vector<int>& recall_ks, RetrievalMetrics* out) {
  if (queries_in_reference && reference_labels.size() != query_labels.size()) {
    return Status::InvalidArgument("retrieval metrics: leave-one-out needs the queries to be the reference set");
  }
  return ComputeRetrievalMetricsPerQuery(neighbors, query_labels, reference_labels,
                                         std::vector<bool>(query_labels.size(), queries_in_reference), true,
                                         recall_ks, out);
}

Status ComputeRetrievalMetricsPerQuery(const NeighborLists& neighbors, const std::vector<int64_t>& query_labels,
                                       const std::vector<int64_t>& reference_labels,
                                       const std::vector<bool>& self_in_reference, bool with_r_metrics,
                                       const std::vector<int>& recall_ks, RetrievalMetrics* out) {
  const int64_t nq = neighbors.num_queries;
  const int64_t k = neighbors.k;
  if (static_cast<int64_t>(query_labels.size()) != nq || static_cast<int64_t>(self_in_reference.size()) != nq) {
    return Status::InvalidArgument("retrieval metrics: " + std::to_string(nq) + " neighbour lists but " +
                                   std::to_string(query_labels.size()) + " query labels and " +
                                   std::to_string(self_in_reference.size()) + " self-in-reference flags");
  }
  if (static_cast<int64_t>(neighbors.ids.size()) != nq * k) {
    return Status::InvalidArgument("retrieval metrics: neighbour ids hold " + std::to_string(neighbors.ids.size()) +
                                   " entries, expected " + std::to_string(nq) + " x " + std::to_string(k));
  }
  for (int rk : recall_ks) {
    if (rk < 1 || rk > k) {
      return Status::InvalidArgument("retrieval metrics: Recall@" + std::to_string(rk) + " needs 1 <= K <= k = " +
                                     std::to_string(k));
    }
  }
  const auto counts = CountLabels(reference_labels);
  const int64_t nref = static_cast<int64_t>(reference_labels.size());
  RetrievalMetrics m;
  std::vector<double> recall_sum(recall_ks.size(), 0.0);
  for (int64_t q = 0; q < nq; ++q) {
    const int64_t label = query_labels[static_cast<size_t>(q)];
    const int64_t r = RelevantCount(counts, label, self_in_reference[static_cast<size_t>(q)]);
    if (r <= 0) continue;
    if (with_r_metrics && r > k) {
      return Status::InvalidArgument("retrieval metrics: query " + std::to_string(q) + " has R = " +
                                     std::to_string(r) + " relevant items but only k = " + std::to_string(k) +
                                     " neighbours were searched");
    }
    const int64_t* row = neighbors.ids.data() + q * k;
    auto relevant = [&](int64_t i) {
      const int64_t id = row[i];
      return id >= 0 && id < nref && reference_labels[static_cast<size_t>(id)] == label;
    };
    ++m.queries;
    m.precision_at_1 += relevant(0) ? 1.0 : 0.0;
    int64_t hits = 0;
    double ap = 0;
    int64_t first_hit = -1;
    for (int64_t i = 0; i < k; ++i) {
      if (!relevant(i)) continue;
      if (first_hit < 0) first_hit = i;
      if (i < r) {
        ++hits;
        ap += static_cast<double>(hits) / static_cast<double>(i + 1);
      }
    }
    if (with_r_metrics) {
      m.r_precision += static_cast<double>(hits) / static_cast<double>(r);
      m.map_at_r += ap / static_cast<double>(r);
    }
    for (size_t j = 0; j < recall_ks.size(); ++j) {
      if (first_hit >= 0 && first_hit < recall_ks[j]) recall_sum[j] += 1.0;
    }
  }
  if (m.queries > 0) {
    const double n = static_cast<double>(m.queries);
    m.precision_at_1 /= n;
    m.r_precision /= n;
    m.map_at_r /= n;
    for (double& s : recall_sum) s /= n;
  }
  for (size_t j = 0; j < recall_ks.size(); ++j) m.recall_at.emplace_back(recall_ks[j], recall_sum[j]);
  *out = std::move(m);
  return Status::OK();
}

std::string FormatRetrievalMetrics(const RetrievalMetrics& m) {
  char buf[128];
  std::snprintf(buf, sizeof buf, "P@1 %.4f  R-Precision %.4f  MAP@R %.4f", m.precision_at_1, m.r_precision,
                m.map_at_r);
  std::string s = buf;
  for (const auto& [kk, v] : m.recall_at) {
    std::snprintf(buf, sizeof buf, "  R@%d %.4f", kk, v);
    s += buf;
  }
  return s;
}

}  // namespace dtrain
