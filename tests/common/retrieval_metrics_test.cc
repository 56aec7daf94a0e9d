#include "dtrain/common/retrieval_metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace dtrain {
namespace {

using ::testing::HasSubstr;

RetrievalMetrics Compute(const std::vector<int64_t>& ids, int64_t nq, int64_t k, const std::vector<int64_t>& ql,
                         const std::vector<int64_t>& rl, bool loo, std::vector<int> ks) {
  NeighborLists nn{ids, nq, k};
  RetrievalMetrics m;
  Status st = ComputeRetrievalMetrics(nn, ql, rl, loo, ks, &m);
  EXPECT_TRUE(st.ok()) << st;
  return m;
}

// One query of class A against references A A B B B, so R = 2.
TEST(RetrievalMetricsTest, HandWorkedSingleQuery) {
  const std::vector<int64_t> refs = {0, 0, 1, 1, 1};
  // Ranking B A A B B: P@1 0; first R=2 hold one A -> R-Precision 1/2;
  // MAP@R = (1/2)(0 + P(2)=1/2) = 1/4; first hit at rank 2.
  RetrievalMetrics m = Compute({2, 0, 1, 3, 4}, 1, 5, {0}, refs, false, {1, 2});
  EXPECT_DOUBLE_EQ(m.precision_at_1, 0.0);
  EXPECT_DOUBLE_EQ(m.r_precision, 0.5);
  EXPECT_DOUBLE_EQ(m.map_at_r, 0.25);
  EXPECT_DOUBLE_EQ(m.recall_at[0].second, 0.0);
  EXPECT_DOUBLE_EQ(m.recall_at[1].second, 1.0);
  // Ranking A B A: P@1 1, R-Precision 1/2, MAP@R = (1/2)(1 + 0) = 1/2: a hit
  // at rank 3 is past R and does not count.
  m = Compute({0, 2, 1}, 1, 3, {0}, refs, false, {1});
  EXPECT_DOUBLE_EQ(m.precision_at_1, 1.0);
  EXPECT_DOUBLE_EQ(m.r_precision, 0.5);
  EXPECT_DOUBLE_EQ(m.map_at_r, 0.5);
  // Perfect ranking: all ones.
  m = Compute({0, 1, 2}, 1, 3, {0}, refs, false, {1});
  EXPECT_DOUBLE_EQ(m.map_at_r, 1.0);
  EXPECT_DOUBLE_EQ(m.r_precision, 1.0);
}

// Leave-one-out over A A B B: R = 1 for every query.
TEST(RetrievalMetricsTest, LeaveOneOutAveragesOverQueries) {
  const std::vector<int64_t> labels = {0, 0, 1, 1};
  const std::vector<int64_t> ids = {
      2, 1, 3,  // query 0: miss, then hit at rank 2
      0, 2, 3,  // query 1: hit
      3, 0, 1,  // query 2: hit
      0, 1, 2,  // query 3: hit only at rank 3
  };
  RetrievalMetrics m = Compute(ids, 4, 3, labels, labels, true, {1, 2, 3});
  EXPECT_EQ(m.queries, 4);
  EXPECT_DOUBLE_EQ(m.precision_at_1, 0.5);
  EXPECT_DOUBLE_EQ(m.r_precision, 0.5);
  EXPECT_DOUBLE_EQ(m.map_at_r, 0.5);
  EXPECT_DOUBLE_EQ(m.recall_at[0].second, 0.5);
  EXPECT_DOUBLE_EQ(m.recall_at[1].second, 0.75);
  EXPECT_DOUBLE_EQ(m.recall_at[2].second, 1.0);
  EXPECT_EQ(MaxRelevant(labels, labels, true), 1);
}

TEST(RetrievalMetricsTest, QueriesWithoutRelevantItemsAreSkipped) {
  // Class 2 has a single member: with the query left out, R = 0.
  const std::vector<int64_t> labels = {0, 0, 2};
  RetrievalMetrics m = Compute({1, 2, 0, 2, 0, 1}, 3, 2, labels, labels, true, {1});
  EXPECT_EQ(m.queries, 2);
  EXPECT_DOUBLE_EQ(m.precision_at_1, 1.0);
}

TEST(RetrievalMetricsTest, TooFewNeighboursIsAnError) {
  const std::vector<int64_t> labels = {0, 0, 0, 1};
  NeighborLists nn{{1, 2, 3, 0}, 4, 1};
  RetrievalMetrics m;
  Status st = ComputeRetrievalMetrics(nn, labels, labels, true, {1}, &m);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("query 0 has R = 2 relevant items but only k = 1"));
  st = ComputeRetrievalMetrics(nn, labels, labels, true, {5}, &m);
  EXPECT_THAT(st.message(), HasSubstr("Recall@5 needs 1 <= K <= k = 1"));
}

}  // namespace
}  // namespace dtrain
