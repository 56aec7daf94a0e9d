// Assigning a model's parameters to S parameter-server shards.
//
// Deterministic and balanced by bytes: the plan depends only on the set of
// (name, element count, element size) and S, never on the order the
// parameters are listed in, so every worker and every shard computes the same
// plan on its own. With S > 1, a tensor larger than a quarter of a shard's
// share, ceil(total bytes / 4S), is split into contiguous slices of at most
// that size, so one large convolution or classifier weight cannot unbalance
// the shards (the greedy placement below keeps every shard within a quarter
// share of the mean, and usually much closer).
//
// Algorithm: pieces (whole tensors, or the slices of split ones) are sorted
// by bytes, largest first (ties by name, then offset), and each goes to the
// shard holding the fewest bytes so far (ties: the lowest shard number).
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dtrain/common/status.h"

namespace dtrain::paramserver {

struct ParamSpec {
  std::string name;
  int64_t numel = 0;        // elements of the flattened tensor
  int64_t element_bytes = 4;
};

// Elements [offset, offset + length) of the flattened tensor `name`.
struct ParamSlice {
  std::string name;
  int64_t offset = 0;
  int64_t length = 0;
  int shard = 0;
};

struct ShardPlan {
  int num_shards = 0;
  // Per shard, its slices sorted by (name, offset).
  std::vector<std::vector<ParamSlice>> shards;
  std::vector<int64_t> shard_bytes;

  // max / mean of shard_bytes (1.0 is perfect balance).
  double Imbalance() const;
};

// InvalidArgument for num_shards < 1, an empty or repeated name, or a
// non-positive size.
Status PlanShards(const std::vector<ParamSpec>& params, int num_shards, ShardPlan* out);

}  // namespace dtrain::paramserver
