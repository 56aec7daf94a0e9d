// Small helpers the single-process benchmarks share.
#pragma once

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "dtrain/common/status.h"

namespace dtrain::bench {

using Clock = std::chrono::steady_clock;

inline double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Prints "PROGRAM: WHAT: STATUS" and exits 1 when `st` is an error.
inline void CheckOrExit(const char* program, const Status& st, const char* what) {
  if (!st.ok()) {
    std::fprintf(stderr, "%s: %s: %s\n", program, what, st.ToString().c_str());
    std::exit(1);
  }
}

}  // namespace dtrain::bench
