#include "dtrain/worker/strategy.h"

namespace dtrain::worker {

Status Strategy::ComputeLoss(models::LossModuleImpl& loss, const torch::Tensor& embeddings,
                             const torch::Tensor& labels, models::LossOutput* out) {
  *out = loss.Compute(embeddings, labels);
  return Status::OK();
}

Status Strategy::ApplyUpdate(torch::optim::Optimizer& optimizer, bool* recompute) {
  *recompute = false;
  optimizer.step();
  return Status::OK();
}

}  // namespace dtrain::worker
