// Samplers: which dataset indices each rank reads at each step.
//
// Protocol, the same for every sampler and every rank:
//   1. Create the sampler (same options on every rank except `rank`).
//   2. Optionally Restore(state) from a checkpoint; otherwise it starts at
//      epoch 0, position 0.
//   3. Call Next() once per training step, on every rank in lockstep; all
//      ranks get true for the same steps (a rank may get an empty batch in a
//      ShardedSampler tail, see below, and must still take part in the step).
//   4. When Next() returns false the epoch is over; the caller calls
//      StartEpoch(epoch + 1) (no automatic advance, so that end-of-epoch work
//      such as evaluation happens at a well-defined point).
//
// SamplerState is world-size independent: `position` counts samples consumed
// by all ranks together, so a checkpoint taken at one world size can be
// restored at another (see each sampler's Restore for the exact guarantee).
//
// Thread-safety: a sampler is owned by one thread; it is not thread-safe.
// Randomness comes only from Rng (transforms.h), so sequences are the same on
// every platform.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/data/transforms.h"

namespace dtrain::data {

struct SamplerState {
  uint64_t epoch = 0;
  // Samples consumed in this epoch, summed over all ranks.
  uint64_t position = 0;
};

inline bool operator==(const SamplerState& a, const SamplerState& b) {
  return a.epoch == b.epoch && a.position == b.position;
}
inline bool operator!=(const SamplerState& a, const SamplerState& b) { return !(a == b); }

// The interface the trainer drives. See the protocol above.
class Sampler {
 public:
  virtual ~Sampler() = default;

  // The indices this rank processes in the next step, or false (and an empty
  // *indices) when the epoch is exhausted.
  virtual bool Next(std::vector<int64_t>* indices) = 0;

  // Begins `epoch` at position 0.
  virtual void StartEpoch(uint64_t epoch) = 0;

  // Where the next Next() continues; save it with the checkpoint.
  virtual SamplerState state() const = 0;

  // Continues from a saved state. InvalidArgument (with the numbers) when the
  // state cannot be reached with this sampler's options; the sampler is then
  // unchanged.
  virtual Status Restore(const SamplerState& state) = 0;

  // Steps (true returns of Next) in one full epoch; the same on every rank.
  virtual int64_t batches_per_epoch() const = 0;

  // Samples a full step consumes over all ranks (the unit of `position`).
  virtual int64_t global_batch() const = 0;
};

// Plain data-parallel sampling: every epoch one global permutation, cut into
// global batches, each global batch split between the ranks.
//
// Epoch e uses the permutation of [0, dataset_size) drawn from
// Rng(Mix(Mix(seed, salt), e)) (the identity when !shuffle); it depends on
// neither world_size nor rank. A step takes G = world_size * local_batch
// consecutive permutation entries starting at `position`; rank r gets entries
// [r * local_batch, (r + 1) * local_batch) of them, and position += G. Ranks
// therefore see disjoint indices, an epoch visits each index at most once,
// and (epoch, position) means the same thing at any world size.
//
// The tail (the last dataset_size mod G entries):
//   drop_last = true:  skipped; the epoch has floor(N / G) steps of G.
//   drop_last = false: one more step consumes it. Its T < G entries are split
//     into contiguous, as-even-as-possible runs: rank r gets
//     floor(T / W) + (r < T mod W ? 1 : 0) entries, so a rank gets an empty
//     batch when T < W (it must still join the step). The epoch then has
//     ceil(N / G) steps and visits every index exactly once.
class ShardedSampler : public Sampler {
 public:
  struct Options {
    int64_t dataset_size = 0;  // required, >= 1
    int world_size = 1;        // Default: 1
    int rank = 0;              // in [0, world_size). Default: 0
    int64_t local_batch = 0;   // samples per rank per step; required, >= 1
    uint64_t seed = 0;         // Default: 0
    bool shuffle = true;       // Default: a fresh permutation every epoch
    bool drop_last = true;     // Default: skip the short tail (see above)
  };

  // InvalidArgument for bad options, including drop_last with a dataset
  // smaller than one global batch (the epoch would be empty).
  static Status Create(const Options& options, std::unique_ptr<ShardedSampler>* out);

  bool Next(std::vector<int64_t>* indices) override;
  void StartEpoch(uint64_t epoch) override;
  SamplerState state() const override { return {epoch_, static_cast<uint64_t>(position_)}; }

  // Accepts any epoch and any position <= dataset_size: global batches then
  // continue from exactly that position of the epoch's permutation, so after
  // a world-size change (whose batch grid differs) the ranks together read
  // exactly the rest of the epoch. With drop_last the epoch ends when fewer
  // than global_batch() samples remain. Positions past the dataset are
  // InvalidArgument and leave the sampler unchanged.
  Status Restore(const SamplerState& state) override;

  int64_t batches_per_epoch() const override { return batches_per_epoch_; }
  int64_t global_batch() const override { return global_batch_; }
  // Samples consumed over all ranks in an epoch started at position 0:
  // floor(N / G) * G with drop_last, else N.
  int64_t epoch_length() const { return epoch_length_; }
  const Options& options() const { return options_; }

 private:
  explicit ShardedSampler(const Options& options);

  Options options_;
  int64_t global_batch_ = 0;
  int64_t batches_per_epoch_ = 0;
  int64_t epoch_length_ = 0;
  uint64_t epoch_ = 0;
  int64_t position_ = 0;
  std::vector<int64_t> permutation_;  // of epoch_
};

// P x K sampling for metric learning (triplet losses): every batch holds P
// distinct classes and K distinct images of each, class by class
// (indices [i*K, (i+1)*K) share a class).
//
// Sharding: the indices of each class are shuffled once with the seed (the
// same for every epoch), the classes are laid end to end, and the j-th index
// of that sequence goes to rank j mod world_size. Shards are disjoint, cover
// the dataset, differ in size by at most one, and every class is split evenly
// (a rank holds floor or ceil of count(c) / world_size images of class c).
//
// Epoch e on rank r draws from Rng(Mix(Mix(Mix(seed, salt), e), r)):
//   1. each class's pool (the rank's images of that class) is shuffled;
//   2. per batch, P classes are drawn uniformly without replacement, and for
//      each, the next K images of its pool are taken. When fewer than K are
//      left, the pool is reshuffled and starts over (the leftovers are skipped
//      for this pass). So within an epoch an image is not repeated before its
//      class's pool is used up, and a batch never holds an image twice.
// batches_per_epoch = floor(dataset_size / (world_size * P * K)), the same on
// every rank (about one pass over the shard); position advances by
// world_size * P * K per step.
class PKSampler : public Sampler {
 public:
  struct Options {
    std::vector<int64_t> labels;  // one per dataset index, in [0, num_classes); copied
    int num_classes = 10;         // Default: 10 (Fashion-MNIST)
    int p = 0;                    // classes per batch; required, in [1, num_classes]
    int k = 0;                    // images per class; required, >= 1
    int world_size = 1;           // Default: 1
    int rank = 0;                 // Default: 0
    uint64_t seed = 0;            // Default: 0
  };

  // InvalidArgument for bad options: p or k out of range, a label outside
  // [0, num_classes), a class with fewer than k images in the smallest shard
  // (checked for every class, so the error is the same on every rank). Since
  // every class then has >= k * world_size images, an epoch has >= 1 batch.
  static Status Create(Options options, std::unique_ptr<PKSampler>* out);

  bool Next(std::vector<int64_t>* indices) override;
  void StartEpoch(uint64_t epoch) override;
  SamplerState state() const override;

  // Accepts any epoch and a position that is a multiple of global_batch()
  // and <= batches_per_epoch() * global_batch(); replays the epoch's draws up
  // to there. At the world size of the checkpoint the continuation is
  // bit-identical to an uninterrupted run. At another world size the data is
  // re-sharded, so it continues from the same global position (same epoch,
  // same number of samples left) but not with the same indices.
  Status Restore(const SamplerState& state) override;

  int64_t batches_per_epoch() const override { return batches_per_epoch_; }
  int64_t global_batch() const override {
    return static_cast<int64_t>(options_.world_size) * options_.p * options_.k;
  }

  // This rank's shard, ascending.
  std::vector<int64_t> ShardIndices() const;

 private:
  explicit PKSampler(Options options);
  void DrawBatch(std::vector<int64_t>* indices);

  Options options_;
  std::vector<std::vector<int64_t>> shard_by_class_;  // this rank's images of each class
  int64_t batches_per_epoch_ = 0;
  uint64_t epoch_ = 0;
  int64_t batches_done_ = 0;  // in epoch_
  Rng rng_{0};
  std::vector<std::vector<int64_t>> pools_;  // per class, shuffled
  std::vector<size_t> cursors_;              // next unused entry of each pool
  std::vector<int> classes_;                 // scratch for drawing classes
};

}  // namespace dtrain::data
