#include "dtrain/paramserver/sharding.h"

#include <algorithm>
#include <numeric>
#include <set>
#include <tuple>

namespace dtrain::paramserver {

double ShardPlan::Imbalance() const {
  if (shard_bytes.empty()) return 1.0;
  const int64_t total = std::accumulate(shard_bytes.begin(), shard_bytes.end(), int64_t{0});
  if (total == 0) return 1.0;
  const double mean = static_cast<double>(total) / static_cast<double>(shard_bytes.size());
  return static_cast<double>(*std::max_element(shard_bytes.begin(), shard_bytes.end())) / mean;
}

Status PlanShards(const std::vector<ParamSpec>& params, int num_shards, ShardPlan* out) {
  if (num_shards < 1) return Status::InvalidArgument("shards must be >= 1, got " + std::to_string(num_shards));
  std::set<std::string> names;
  int64_t total = 0;
  for (const ParamSpec& p : params) {
    if (p.name.empty()) return Status::InvalidArgument("a parameter has no name");
    if (!names.insert(p.name).second) return Status::InvalidArgument("parameter '" + p.name + "' is listed twice");
    if (p.numel < 1 || p.element_bytes < 1) {
      return Status::InvalidArgument("parameter '" + p.name + "' has no elements or a bad element size");
    }
    total += p.numel * p.element_bytes;
  }
  // Pieces of at most a quarter of a shard's share: greedy placement then
  // lands within a quarter share of the mean (it is usually much closer).
  const int64_t target = std::max<int64_t>(1, (total + 4 * num_shards - 1) / (4 * num_shards));
  struct Piece {
    ParamSlice slice;
    int64_t bytes;
  };
  std::vector<Piece> pieces;
  for (const ParamSpec& p : params) {
    const int64_t bytes = p.numel * p.element_bytes;
    int64_t parts = num_shards > 1 && bytes > target ? (bytes + target - 1) / target : 1;
    parts = std::min(parts, p.numel);
    const int64_t base = p.numel / parts, extra = p.numel % parts;
    int64_t offset = 0;
    for (int64_t i = 0; i < parts; ++i) {
      const int64_t len = base + (i < extra ? 1 : 0);
      pieces.push_back({ParamSlice{p.name, offset, len, 0}, len * p.element_bytes});
      offset += len;
    }
  }
  std::sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) {
    return std::make_tuple(-a.bytes, a.slice.name, a.slice.offset) < std::make_tuple(-b.bytes, b.slice.name, b.slice.offset);
  });
  ShardPlan plan;
  plan.num_shards = num_shards;
  plan.shards.assign(static_cast<size_t>(num_shards), {});
  plan.shard_bytes.assign(static_cast<size_t>(num_shards), 0);
  for (Piece& piece : pieces) {
    const int s = static_cast<int>(std::min_element(plan.shard_bytes.begin(), plan.shard_bytes.end()) -
                                   plan.shard_bytes.begin());
    piece.slice.shard = s;
    plan.shard_bytes[static_cast<size_t>(s)] += piece.bytes;
    plan.shards[static_cast<size_t>(s)].push_back(piece.slice);
  }
  for (auto& slices : plan.shards) {
    std::sort(slices.begin(), slices.end(), [](const ParamSlice& a, const ParamSlice& b) {
      return std::tie(a.name, a.offset) < std::tie(b.name, b.offset);
    });
  }
  *out = std::move(plan);
  return Status::OK();
}

}  // namespace dtrain::paramserver
