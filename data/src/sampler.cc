#include "dtrain/data/sampler.h"

#include <algorithm>
#include <numeric>
#include <string>
#include <utility>

namespace dtrain::data {
namespace {

// Salts keep the samplers' random streams apart from each other and from
// AugmentSeed(seed, epoch, index) when callers reuse one seed for all.
constexpr uint64_t kShardedPermutationSalt = 0x5348415244454421ull;  // "SHARDED!"
constexpr uint64_t kPkShardSalt = 0x504b53484152442eull;             // "PKSHARD."
constexpr uint64_t kPkEpochSalt = 0x504b45504f434821ull;             // "PKEPOCH!"

std::string Str(int64_t v) { return std::to_string(v); }

Status ValidateWorld(const char* who, int world_size, int rank) {
  if (world_size < 1) {
    return Status::InvalidArgument(std::string(who) + ": world_size must be >= 1, got " + Str(world_size));
  }
  if (rank < 0 || rank >= world_size) {
    return Status::InvalidArgument(std::string(who) + ": rank must be in [0, " + Str(world_size - 1) + "], got " +
                                   Str(rank));
  }
  return Status::OK();
}

}  // namespace

// ---- ShardedSampler ---------------------------------------------------------

ShardedSampler::ShardedSampler(const Options& options) : options_(options) {
  global_batch_ = static_cast<int64_t>(options.world_size) * options.local_batch;
  const int64_t full = options.dataset_size / global_batch_;
  if (options.drop_last || options.dataset_size % global_batch_ == 0) {
    batches_per_epoch_ = full;
    epoch_length_ = full * global_batch_;
  } else {
    batches_per_epoch_ = full + 1;
    epoch_length_ = options.dataset_size;
  }
}

Status ShardedSampler::Create(const Options& options, std::unique_ptr<ShardedSampler>* out) {
  const char* who = "ShardedSampler";
  if (options.dataset_size < 1) {
    return Status::InvalidArgument(std::string(who) + ": dataset_size must be >= 1, got " +
                                   Str(options.dataset_size));
  }
  DTRAIN_RETURN_IF_ERROR(ValidateWorld(who, options.world_size, options.rank));
  if (options.local_batch < 1) {
    return Status::InvalidArgument(std::string(who) + ": local_batch must be >= 1, got " + Str(options.local_batch));
  }
  const int64_t global = static_cast<int64_t>(options.world_size) * options.local_batch;
  if (options.drop_last && options.dataset_size < global) {
    return Status::InvalidArgument(std::string(who) + ": the dataset of " + Str(options.dataset_size) +
                                   " samples is smaller than one global batch of " + Str(global) + " (world_size " +
                                   Str(options.world_size) + " x local_batch " + Str(options.local_batch) +
                                   "), so with drop_last an epoch would be empty; lower local_batch or disable "
                                   "drop_last");
  }
  std::unique_ptr<ShardedSampler> sampler(new ShardedSampler(options));
  sampler->StartEpoch(0);
  *out = std::move(sampler);
  return Status::OK();
}

void ShardedSampler::StartEpoch(uint64_t epoch) {
  epoch_ = epoch;
  position_ = 0;
  permutation_.resize(static_cast<size_t>(options_.dataset_size));
  std::iota(permutation_.begin(), permutation_.end(), int64_t{0});
  if (options_.shuffle) {
    Rng rng(Rng::Mix(Rng::Mix(options_.seed, kShardedPermutationSalt), epoch));
    rng.Shuffle(&permutation_);
  }
}

bool ShardedSampler::Next(std::vector<int64_t>* indices) {
  indices->clear();
  // The epoch ends when the permutation is used up, or, with drop_last, when
  // what is left cannot fill a global batch. Checking the remainder (not a
  // precomputed length) lets a restored position lie anywhere: a checkpoint
  // taken at another world size need not sit on this run's batch grid.
  const int64_t remaining = options_.dataset_size - position_;
  if (remaining <= 0 || (options_.drop_last && remaining < global_batch_)) return false;
  int64_t begin = 0;
  int64_t count = 0;
  if (remaining >= global_batch_) {
    begin = position_ + options_.rank * options_.local_batch;
    count = options_.local_batch;
    position_ += global_batch_;
  } else {
    // The tail without drop_last: contiguous, as-even-as-possible runs.
    const int64_t w = options_.world_size;
    const int64_t r = options_.rank;
    const int64_t base = remaining / w;
    const int64_t extra = remaining % w;
    begin = position_ + r * base + std::min(r, extra);
    count = base + (r < extra ? 1 : 0);
    position_ = options_.dataset_size;
  }
  indices->assign(permutation_.begin() + begin, permutation_.begin() + begin + count);
  return true;
}

Status ShardedSampler::Restore(const SamplerState& state) {
  if (state.position > static_cast<uint64_t>(options_.dataset_size)) {
    return Status::InvalidArgument("ShardedSampler::Restore: position " + std::to_string(state.position) +
                                   " of epoch " + std::to_string(state.epoch) +
                                   " is past the end of the dataset of " + Str(options_.dataset_size) + " samples");
  }
  StartEpoch(state.epoch);
  position_ = static_cast<int64_t>(state.position);
  return Status::OK();
}

// ---- PKSampler --------------------------------------------------------------

PKSampler::PKSampler(Options options) : options_(std::move(options)) {}

Status PKSampler::Create(Options options, std::unique_ptr<PKSampler>* out) {
  const char* who = "PKSampler";
  DTRAIN_RETURN_IF_ERROR(ValidateWorld(who, options.world_size, options.rank));
  if (options.num_classes < 1) {
    return Status::InvalidArgument(std::string(who) + ": num_classes must be >= 1, got " + Str(options.num_classes));
  }
  if (options.p < 1 || options.p > options.num_classes) {
    return Status::InvalidArgument(std::string(who) + ": p (classes per batch) must be in [1, num_classes = " +
                                   Str(options.num_classes) + "], got " + Str(options.p));
  }
  if (options.k < 1) {
    return Status::InvalidArgument(std::string(who) + ": k (images per class) must be >= 1, got " + Str(options.k));
  }
  const int64_t n = static_cast<int64_t>(options.labels.size());
  const int64_t world = options.world_size;
  std::vector<std::vector<int64_t>> by_class(static_cast<size_t>(options.num_classes));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t label = options.labels[static_cast<size_t>(i)];
    if (label < 0 || label >= options.num_classes) {
      return Status::InvalidArgument(std::string(who) + ": label " + Str(label) + " of index " + Str(i) +
                                     " is outside [0, num_classes = " + Str(options.num_classes) + ")");
    }
    by_class[static_cast<size_t>(label)].push_back(i);
  }
  for (int c = 0; c < options.num_classes; ++c) {
    const int64_t count = static_cast<int64_t>(by_class[static_cast<size_t>(c)].size());
    const int64_t smallest = count / world;
    if (smallest < options.k) {
      return Status::InvalidArgument(std::string(who) + ": k = " + Str(options.k) + " images per class, but class " +
                                     Str(c) + " has only " + Str(smallest) + " images in the smallest shard (" +
                                     Str(count) + " in the dataset, split over world_size " + Str(world) +
                                     "); lower k or world_size");
    }
  }
  // Every class has >= k * world_size images, so n >= num_classes * k *
  // world_size >= one global batch: batches_per_epoch >= 1.
  const int64_t global = world * options.p * options.k;

  std::unique_ptr<PKSampler> sampler(new PKSampler(std::move(options)));
  const Options& o = sampler->options_;
  // Deal the classes' shuffled images, laid end to end, round-robin.
  sampler->shard_by_class_.resize(by_class.size());
  int64_t dealt = 0;
  for (int c = 0; c < o.num_classes; ++c) {
    std::vector<int64_t>& members = by_class[static_cast<size_t>(c)];
    Rng rng(Rng::Mix(Rng::Mix(o.seed, kPkShardSalt), static_cast<uint64_t>(c)));
    rng.Shuffle(&members);
    std::vector<int64_t>& mine = sampler->shard_by_class_[static_cast<size_t>(c)];
    for (int64_t index : members) {
      if (dealt % world == o.rank) mine.push_back(index);
      ++dealt;
    }
    std::sort(mine.begin(), mine.end());
  }
  sampler->batches_per_epoch_ = n / global;
  sampler->StartEpoch(0);
  *out = std::move(sampler);
  return Status::OK();
}

void PKSampler::StartEpoch(uint64_t epoch) {
  epoch_ = epoch;
  batches_done_ = 0;
  rng_ = Rng(Rng::Mix(Rng::Mix(Rng::Mix(options_.seed, kPkEpochSalt), epoch), static_cast<uint64_t>(options_.rank)));
  pools_ = shard_by_class_;
  for (auto& pool : pools_) rng_.Shuffle(&pool);
  cursors_.assign(pools_.size(), 0);
}

void PKSampler::DrawBatch(std::vector<int64_t>* indices) {
  const size_t k = static_cast<size_t>(options_.k);
  classes_.resize(static_cast<size_t>(options_.num_classes));
  std::iota(classes_.begin(), classes_.end(), 0);
  indices->clear();
  indices->reserve(static_cast<size_t>(options_.p) * k);
  for (size_t i = 0; i < static_cast<size_t>(options_.p); ++i) {
    // Partial Fisher-Yates: classes_[0, i] are the classes drawn so far.
    const size_t j = i + static_cast<size_t>(rng_.Uniform(classes_.size() - i));
    std::swap(classes_[i], classes_[j]);
    const size_t c = static_cast<size_t>(classes_[i]);
    std::vector<int64_t>& pool = pools_[c];
    if (pool.size() - cursors_[c] < k) {
      rng_.Shuffle(&pool);
      cursors_[c] = 0;
    }
    indices->insert(indices->end(), pool.begin() + static_cast<std::ptrdiff_t>(cursors_[c]),
                    pool.begin() + static_cast<std::ptrdiff_t>(cursors_[c] + k));
    cursors_[c] += k;
  }
}

bool PKSampler::Next(std::vector<int64_t>* indices) {
  if (batches_done_ >= batches_per_epoch_) {
    indices->clear();
    return false;
  }
  DrawBatch(indices);
  ++batches_done_;
  return true;
}

SamplerState PKSampler::state() const {
  return {epoch_, static_cast<uint64_t>(batches_done_ * global_batch())};
}

Status PKSampler::Restore(const SamplerState& state) {
  const uint64_t global = static_cast<uint64_t>(global_batch());
  const uint64_t length = static_cast<uint64_t>(batches_per_epoch_) * global;
  const std::string at = "PKSampler::Restore: position " + std::to_string(state.position) + " of epoch " +
                         std::to_string(state.epoch);
  if (state.position > length) {
    return Status::InvalidArgument(at + " is past the end of the epoch, which has " + std::to_string(length) +
                                   " samples here (" + Str(batches_per_epoch_) + " batches of " +
                                   std::to_string(global) + ")");
  }
  if (state.position % global != 0) {
    return Status::InvalidArgument(at + " is not a multiple of the global batch " + std::to_string(global) +
                                   " (world_size " + Str(options_.world_size) + " x p " + Str(options_.p) + " x k " +
                                   Str(options_.k) + ")");
  }
  StartEpoch(state.epoch);
  std::vector<int64_t> scratch;
  const int64_t batches = static_cast<int64_t>(state.position / global);
  for (int64_t b = 0; b < batches; ++b) DrawBatch(&scratch);
  batches_done_ = batches;
  return Status::OK();
}

std::vector<int64_t> PKSampler::ShardIndices() const {
  std::vector<int64_t> all;
  for (const auto& members : shard_by_class_) all.insert(all.end(), members.begin(), members.end());
  std::sort(all.begin(), all.end());
  return all;
}

}  // namespace dtrain::data
