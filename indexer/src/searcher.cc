#include "dtrain/indexer/searcher.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>

#include "dtrain/data/image_io.h"
#include "dtrain/indexer/gallery.h"
#include "dtrain/indexer/index_builder.h"
#include "dtrain/indexer/metadata_store.h"
#include "dtrain/indexer/vector_index.h"
#include "model_io.h"

namespace dtrain::indexer {
namespace fs = std::filesystem;

struct Searcher::Model {
  internal::LoadedModel loaded;
};

Searcher::~Searcher() = default;

Status Searcher::Open(const SearcherOptions& options, std::unique_ptr<Searcher>* out) {
  std::unique_ptr<Searcher> s(new Searcher());
  s->options_ = options;
  const std::string& dir = options.index_dir;
  DTRAIN_RETURN_IF_ERROR(ReadIndexManifest(dir, &s->manifest_));
  const IndexManifest& m = s->manifest_;
  // The model: the index's own copy (digest checked) or the one asked for.
  s->model_ = std::make_unique<Model>();
  const std::string own_model = (fs::path(dir) / "model.pt").string();
  if (options.model.empty()) {
    std::string digest;
    DTRAIN_RETURN_IF_ERROR(internal::FileDigest(own_model, &digest));
    if (digest != m.model_digest()) {
      return Status::Corruption(own_model + " has crc32c " + digest + " but the manifest says " + m.model_digest());
    }
    DTRAIN_RETURN_IF_ERROR(internal::LoadModelSource(own_model, false, &s->model_->loaded));
  } else {
    DTRAIN_RETURN_IF_ERROR(internal::LoadModelSource(options.model, false, &s->model_->loaded));
  }
  const int64_t model_dim = s->model_->loaded.model->embedding_dim();
  if (model_dim != m.embedding_dim()) {
    return Status::InvalidArgument("the model " + s->model_->loaded.description + " makes " +
                                   std::to_string(model_dim) + "-dimensional embeddings but the index " + dir +
                                   " holds " + std::to_string(m.embedding_dim()) + "-dimensional ones");
  }
  IndexConfig params = m.params();
  if (options.hnsw_ef_search > 0) params.set_hnsw_ef_search(options.hnsw_ef_search);
  if (options.ivf_nprobe > 0) params.set_ivf_nprobe(options.ivf_nprobe);
  DTRAIN_RETURN_IF_ERROR(VectorIndex::Load((fs::path(dir) / "index.faiss").string(), params, &s->index_));
  if (s->index_->dim() != m.embedding_dim() || s->index_->size() != m.count()) {
    return Status::Corruption(dir + ": index.faiss holds " + std::to_string(s->index_->size()) + " vectors of " +
                              std::to_string(s->index_->dim()) + " but the manifest says " + std::to_string(m.count()) +
                              " of " + std::to_string(m.embedding_dim()));
  }
  DTRAIN_RETURN_IF_ERROR(MetadataStore::OpenReadOnly((fs::path(dir) / "meta").string(), &s->meta_));
  internal::UseThreads(options.threads);
  *out = std::move(s);
  return Status::OK();
}

Status Searcher::Embed(const data::Dataset& images, std::vector<float>* out) const {
  if (images.rows != manifest_.image_rows() || images.cols != manifest_.image_cols()) {
    return Status::InvalidArgument("query images are " + std::to_string(images.rows) + "x" +
                                   std::to_string(images.cols) + "; the index takes " +
                                   std::to_string(manifest_.image_rows()) + "x" +
                                   std::to_string(manifest_.image_cols()));
  }
  return internal::EmbedImages(*model_->loaded.model, images, 512, false, "", out);
}

Status Searcher::Search(const float* queries, int64_t n, int k, std::vector<float>* scores,
                        std::vector<int64_t>* ids) const {
  return index_->Search(queries, n, k, scores, ids);
}

Status Searcher::Lookup(int64_t id, ItemMeta* out) const { return meta_->Get(id, out); }

Status Searcher::Dataset(data::Split split, const data::Dataset** out) const {
  std::lock_guard<std::mutex> lock(datasets_mu_);
  auto it = datasets_.find(split);
  if (it == datasets_.end()) {
    auto d = std::make_unique<data::Dataset>();
    data::FashionMnistOptions fo;
    fo.dir = options_.data_dir;
    fo.split = split;
    DTRAIN_RETURN_IF_ERROR(data::LoadFashionMnist(fo, d.get()));
    it = datasets_.emplace(split, std::move(d)).first;
  }
  *out = it->second.get();
  return Status::OK();
}

Status Searcher::Query(const QueryRequest& request, QueryReply* reply) const {
  const int k = request.k();
  if (k < 1 || k > kMaxQueryK) {
    return Status::InvalidArgument("k must be in [1, " + std::to_string(kMaxQueryK) + "], got " + std::to_string(k));
  }
  if (request.queries_size() == 0) return Status::InvalidArgument("the request has no query images");
  if (request.queries_size() > kMaxQueriesPerRequest) {
    return Status::InvalidArgument("at most " + std::to_string(kMaxQueriesPerRequest) + " queries per request, got " +
                                   std::to_string(request.queries_size()));
  }
  // Assemble every query image first: a bad one fails the request before any
  // search runs.
  data::Dataset batch;
  batch.rows = manifest_.image_rows();
  batch.cols = manifest_.image_cols();
  batch.source = "query";
  std::vector<std::string> names;
  std::vector<int> labels;
  for (int i = 0; i < request.queries_size(); ++i) {
    const QueryImage& q = request.queries(i);
    const std::string where = "query " + std::to_string(i) + (q.name().empty() ? "" : " (" + q.name() + ")");
    data::GrayImage img;
    int label = -1;
    std::string name = q.name();
    switch (q.source_case()) {
      case QueryImage::kImageFile:
        DTRAIN_RETURN_IF_ERROR(data::DecodeGrayImage(q.image_file(), where, &img));
        break;
      case QueryImage::kDataset: {
        data::Split split;
        if (!ParseDatasetSpec(q.dataset().split(), &split)) {
          return Status::InvalidArgument(where + ": unknown split '" + q.dataset().split() + "' (train or test)");
        }
        const data::Dataset* d = nullptr;
        DTRAIN_RETURN_IF_ERROR(Dataset(split, &d));
        const int64_t idx = q.dataset().index();
        if (idx < 0 || idx >= d->size) {
          return Status::InvalidArgument(where + ": index " + std::to_string(idx) + " is outside the " +
                                         data::SplitName(split) + " split (0.." + std::to_string(d->size - 1) + ")");
        }
        img.rows = d->rows;
        img.cols = d->cols;
        img.pixels.assign(d->image(idx), d->image(idx) + static_cast<size_t>(d->rows) * d->cols);
        label = d->labels[static_cast<size_t>(idx)];
        if (name.empty()) name = std::string("fashion_mnist:") + data::SplitName(split) + "[" + std::to_string(idx) + "]";
        break;
      }
      case QueryImage::kPixels:
        img.rows = q.pixels().rows();
        img.cols = q.pixels().cols();
        if (img.rows < 1 || img.cols < 1 ||
            q.pixels().pixels().size() != static_cast<size_t>(img.rows) * static_cast<size_t>(img.cols)) {
          return Status::InvalidArgument(where + ": raw image of " + std::to_string(img.rows) + "x" +
                                         std::to_string(img.cols) + " needs that many bytes, got " +
                                         std::to_string(q.pixels().pixels().size()));
        }
        img.pixels.assign(q.pixels().pixels().begin(), q.pixels().pixels().end());
        break;
      case QueryImage::SOURCE_NOT_SET:
        return Status::InvalidArgument(where + " has no image (image_file, dataset or pixels)");
    }
    if (img.rows != batch.rows || img.cols != batch.cols) {
      return Status::InvalidArgument(where + " is " + std::to_string(img.rows) + "x" + std::to_string(img.cols) +
                                     "; the index takes " + std::to_string(batch.rows) + "x" +
                                     std::to_string(batch.cols) + " images");
    }
    batch.images.insert(batch.images.end(), img.pixels.begin(), img.pixels.end());
    batch.labels.push_back(static_cast<uint8_t>(std::max(label, 0)));
    ++batch.size;
    names.push_back(name.empty() ? "query " + std::to_string(i) : name);
    labels.push_back(label);
  }
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<float> emb;
  DTRAIN_RETURN_IF_ERROR(Embed(batch, &emb));
  const auto t1 = std::chrono::steady_clock::now();
  std::vector<float> scores;
  std::vector<int64_t> ids;
  DTRAIN_RETURN_IF_ERROR(Search(emb.data(), batch.size, k, &scores, &ids));
  const auto t2 = std::chrono::steady_clock::now();
  QueryReply r;
  for (int64_t i = 0; i < batch.size; ++i) {
    QueryResult* res = r.add_results();
    res->set_query(names[static_cast<size_t>(i)]);
    res->set_query_label(labels[static_cast<size_t>(i)]);
    for (int j = 0; j < k; ++j) {
      const int64_t id = ids[static_cast<size_t>(i * k + j)];
      if (id < 0) break;
      Neighbor* nb = res->add_neighbors();
      nb->set_id(id);
      nb->set_score(scores[static_cast<size_t>(i * k + j)]);
      DTRAIN_RETURN_IF_ERROR(Lookup(id, nb->mutable_meta()));
    }
  }
  r.set_embed_seconds(std::chrono::duration<double>(t1 - t0).count());
  r.set_search_seconds(std::chrono::duration<double>(t2 - t1).count());
  *reply = std::move(r);
  return Status::OK();
}

}  // namespace dtrain::indexer
