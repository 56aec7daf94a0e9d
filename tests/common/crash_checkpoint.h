// The checkpoints the crash tests write and check: contents derived from the
// step alone, so the test can verify any checkpoint the killed child left.
// Shared by checkpoint_crash_writer.cc (the child) and checkpoint_store_test.cc.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "dtrain/common/checkpoint_store.h"

namespace dtrain::testing_crash {

inline uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline dtrain::CheckpointData MakeCrashCheckpoint(int64_t step, int mb) {
  dtrain::CheckpointData d;
  d.job_name = "crash_test";
  d.config_digest = "digest-1";
  d.step = step;
  d.epoch = step / 10;
  d.mode = "local";
  const int64_t floats = static_cast<int64_t>(mb) * (1 << 20) / 4;
  const int64_t sizes[] = {floats / 2, floats / 4, floats / 4 - 3, 3};
  for (int i = 0; i < 4; ++i) {
    dtrain::TensorRecord t;
    t.name = "w" + std::to_string(i);
    t.shape = {sizes[i]};
    t.bytes.resize(static_cast<size_t>(sizes[i]) * 4);
    uint64_t state = static_cast<uint64_t>(step) * 1000 + static_cast<uint64_t>(i);
    for (size_t off = 0; off < t.bytes.size(); off += 8) {
      const uint64_t v = SplitMix64(&state);
      std::memcpy(&t.bytes[off], &v, std::min<size_t>(8, t.bytes.size() - off));
    }
    d.tensors.push_back(std::move(t));
  }
  dtrain::TensorRecord s;
  s.name = "step";
  s.dtype = dtrain::DType::kInt64;
  s.shape = {};
  s.bytes.resize(8);
  std::memcpy(s.bytes.data(), &step, 8);
  d.tensors.push_back(std::move(s));
  d.sections["trainer"] = "step=" + std::to_string(step);
  return d;
}

}  // namespace dtrain::testing_crash
