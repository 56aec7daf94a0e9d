#include "dtrain/worker/evaluation.h"

#include <algorithm>

namespace dtrain::worker {

std::vector<int64_t> Labels(const data::Dataset& dataset) {
  return std::vector<int64_t>(dataset.labels.begin(), dataset.labels.end());
}

torch::Tensor EmbedDataset(models::EmbedderImpl& model, const data::Dataset& dataset, int64_t batch_size,
                           const data::NormalizeOptions& normalize, const std::function<void(int64_t)>& on_batch) {
  const bool was_training = model.is_training();
  if (was_training) model.eval();
  torch::NoGradGuard no_grad;
  const int64_t n = dataset.size;
  const int64_t pixels = static_cast<int64_t>(dataset.rows) * dataset.cols;
  torch::Tensor out = torch::empty({n, model.embedding_dim()});
  torch::Tensor batch = torch::empty({std::min(batch_size, n), 1, dataset.rows, dataset.cols});
  for (int64_t begin = 0; begin < n; begin += batch_size) {
    const int64_t count = std::min(batch_size, n - begin);
    torch::Tensor view = batch.narrow(0, 0, count);
    float* dst = view.data_ptr<float>();
    for (int64_t i = 0; i < count; ++i) {
      data::NormalizeImage(dataset.image(begin + i), dataset.rows, dataset.cols, normalize, dst + i * pixels);
    }
    out.narrow(0, begin, count).copy_(model.forward(view));
    if (on_batch) on_batch(begin + count);
  }
  if (was_training) model.train(true);
  return out;
}

torch::Tensor RawPixelEmbeddings(const data::Dataset& dataset) {
  const int64_t pixels = static_cast<int64_t>(dataset.rows) * dataset.cols;
  torch::Tensor raw = torch::from_blob(const_cast<uint8_t*>(dataset.images.data()), {dataset.size, pixels},
                                       torch::kUInt8)
                          .to(torch::kFloat32);
  return torch::nn::functional::normalize(raw, torch::nn::functional::NormalizeFuncOptions().dim(1));
}

Status ExactNeighbors(const torch::Tensor& queries, const torch::Tensor& reference, bool leave_one_out, int64_t k,
                      NeighborLists* out) {
  if (queries.dim() != 2 || reference.dim() != 2 || queries.size(1) != reference.size(1)) {
    return Status::InvalidArgument("exact search: queries " + std::to_string(queries.dim() == 2 ? queries.size(1) : -1) +
                                   "-d and reference " +
                                   std::to_string(reference.dim() == 2 ? reference.size(1) : -1) +
                                   "-d must be 2-D with equal widths");
  }
  const int64_t nq = queries.size(0);
  const int64_t nr = reference.size(0);
  const int64_t available = leave_one_out ? nr - 1 : nr;
  if (k < 1 || k > available) {
    return Status::InvalidArgument("exact search: k = " + std::to_string(k) + " must be in [1, " +
                                   std::to_string(available) + "]");
  }
  torch::NoGradGuard no_grad;
  out->num_queries = nq;
  out->k = k;
  out->ids.assign(static_cast<size_t>(nq * k), -1);
  const torch::Tensor ref_t = reference.t().contiguous();
  constexpr int64_t kBlock = 512;
  for (int64_t begin = 0; begin < nq; begin += kBlock) {
    const int64_t count = std::min(kBlock, nq - begin);
    torch::Tensor sims = torch::mm(queries.narrow(0, begin, count), ref_t);
    if (leave_one_out) {
      torch::Tensor rows = torch::arange(count, torch::kLong);
      sims.index_put_({rows, rows + begin}, -std::numeric_limits<float>::infinity());
    }
    torch::Tensor idx = std::get<1>(sims.topk(k, /*dim=*/1, /*largest=*/true, /*sorted=*/true)).contiguous();
    std::copy_n(idx.data_ptr<int64_t>(), count * k, out->ids.begin() + begin * k);
  }
  return Status::OK();
}

Status EvaluateEmbeddings(const torch::Tensor& embeddings, const std::vector<int64_t>& labels,
                          const std::vector<int>& recall_ks, RetrievalMetrics* out) {
  int64_t k = MaxRelevant(labels, labels, /*queries_in_reference=*/true);
  for (int rk : recall_ks) k = std::max<int64_t>(k, rk);
  k = std::min<int64_t>(k, embeddings.size(0) - 1);
  NeighborLists nn;
  DTRAIN_RETURN_IF_ERROR(ExactNeighbors(embeddings, embeddings, /*leave_one_out=*/true, k, &nn));
  return ComputeRetrievalMetrics(nn, labels, labels, /*queries_in_reference=*/true, recall_ks, out);
}

}  // namespace dtrain::worker
