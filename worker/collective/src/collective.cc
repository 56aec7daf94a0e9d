#include "dtrain/worker/collective/collective.h"

namespace dtrain::collective {

Status WaitAll(const std::vector<std::shared_ptr<Work>>& works) {
  Status first;
  for (const auto& w : works) {
    if (!w) continue;
    Status st = w->Wait();
    if (!st.ok() && first.ok()) first = st;
  }
  return first;
}

const char* ReduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kAverage: return "average";
    case ReduceOp::kMax: return "max";
  }
  return "?";
}

const char* WireTypeName(WireType wire) {
  switch (wire) {
    case WireType::kNative: return "native";
    case WireType::kFp16: return "fp16";
    case WireType::kBf16: return "bf16";
  }
  return "?";
}

}  // namespace dtrain::collective
