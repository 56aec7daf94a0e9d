#include "dtrain/indexer/vector_index.h"

#include <faiss/IndexFlat.h>
#include <faiss/IndexHNSW.h>
#include <faiss/IndexIDMap.h>
#include <faiss/IndexIVFFlat.h>
#include <faiss/impl/FaissException.h>
#include <faiss/index_io.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <unordered_set>

namespace dtrain::indexer {
namespace {

template <typename Fn>
Status Guard(const std::string& what, Fn&& fn) {
  try {
    return fn();
  } catch (const faiss::FaissException& e) {
    return Status::Internal(what + ": FAISS: " + e.what());
  } catch (const std::exception& e) {
    return Status::Internal(what + ": " + e.what());
  }
}

}  // namespace

bool ParseIndexKind(const std::string& name, IndexConfig::Kind* kind) {
  std::string n = name;
  std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return std::tolower(c); });
  if (n == "flat") *kind = IndexConfig::FLAT;
  else if (n == "hnsw") *kind = IndexConfig::HNSW;
  else if (n == "ivf") *kind = IndexConfig::IVF;
  else return false;
  return true;
}

const char* IndexKindName(IndexConfig::Kind kind) {
  switch (kind) {
    case IndexConfig::FLAT: return "FLAT";
    case IndexConfig::HNSW: return "HNSW";
    case IndexConfig::IVF: return "IVF";
  }
  return "?";
}

struct VectorIndex::Faiss {
  std::unique_ptr<faiss::IndexIDMap2> index;
};

VectorIndex::VectorIndex() : f_(std::make_unique<Faiss>()) {}
VectorIndex::~VectorIndex() = default;

int64_t VectorIndex::size() const { return f_->index ? static_cast<int64_t>(f_->index->ntotal) : 0; }

Status VectorIndex::ApplySearchParams(const IndexConfig& params) {
  params_.set_hnsw_ef_search(params.hnsw_ef_search());
  params_.set_ivf_nprobe(params.ivf_nprobe());
  if (auto* h = dynamic_cast<faiss::IndexHNSW*>(f_->index->index)) h->hnsw.efSearch = params.hnsw_ef_search();
  if (auto* ivf = dynamic_cast<faiss::IndexIVF*>(f_->index->index)) {
    const int nprobe = std::max(1, std::min<int>(params.ivf_nprobe(), static_cast<int>(ivf->nlist)));
    ivf->nprobe = static_cast<size_t>(nprobe);
    params_.set_ivf_nprobe(nprobe);
    // Reconstruction (evaluation against exact search) needs the id -> list map.
    if (ivf->direct_map.type == faiss::DirectMap::NoMap) ivf->make_direct_map(true);
  }
  return Status::OK();
}

Status VectorIndex::Build(const IndexConfig& params, int dim, const float* vectors, const int64_t* ids, int64_t n,
                          std::unique_ptr<VectorIndex>* out, IndexConfig* effective) {
  if (n <= 0) return Status::InvalidArgument("cannot build an index over no vectors");
  if (dim < 1) return Status::InvalidArgument("embedding dimension must be >= 1, got " + std::to_string(dim));
  std::unordered_set<int64_t> seen;
  for (int64_t i = 0; i < n; ++i) {
    if (!seen.insert(ids[i]).second) return Status::InvalidArgument("id " + std::to_string(ids[i]) + " repeats");
  }
  std::unique_ptr<VectorIndex> vi(new VectorIndex());
  vi->params_ = params;
  vi->kind_ = params.kind();
  vi->dim_ = dim;
  DTRAIN_RETURN_IF_ERROR(Guard(std::string("building the ") + IndexKindName(params.kind()) + " index", [&]() -> Status {
    faiss::Index* inner = nullptr;
    switch (params.kind()) {
      case IndexConfig::FLAT:
        inner = new faiss::IndexFlatIP(dim);
        break;
      case IndexConfig::HNSW: {
        auto* h = new faiss::IndexHNSWFlat(dim, params.hnsw_m(), faiss::METRIC_INNER_PRODUCT);
        h->hnsw.efConstruction = params.hnsw_ef_construction();
        inner = h;
        break;
      }
      case IndexConfig::IVF: {
        int nlist = params.ivf_nlist();
        if (nlist > n) {
          spdlog::warn("IVF: nlist {} is more than the {} vectors; using nlist {}", nlist, n, n);
          nlist = static_cast<int>(n);
        }
        vi->params_.set_ivf_nlist(nlist);
        auto* quantizer = new faiss::IndexFlatIP(dim);
        auto* ivf = new faiss::IndexIVFFlat(quantizer, dim, static_cast<size_t>(nlist), faiss::METRIC_INNER_PRODUCT);
        ivf->own_fields = true;
        ivf->cp.seed = 1234;  // deterministic k-means
        ivf->train(n, vectors);
        inner = ivf;
        break;
      }
    }
    vi->f_->index = std::make_unique<faiss::IndexIDMap2>(inner);
    vi->f_->index->own_fields = true;
    vi->f_->index->add_with_ids(n, vectors, ids);
    return Status::OK();
  }));
  DTRAIN_RETURN_IF_ERROR(vi->ApplySearchParams(params));
  if (effective) *effective = vi->params_;
  *out = std::move(vi);
  return Status::OK();
}

Status VectorIndex::Load(const std::string& path, const IndexConfig& params, std::unique_ptr<VectorIndex>* out) {
  std::unique_ptr<VectorIndex> vi(new VectorIndex());
  Status st = Guard("reading " + path, [&]() -> Status {
    std::unique_ptr<faiss::Index> raw(faiss::read_index(path.c_str()));
    auto* idmap = dynamic_cast<faiss::IndexIDMap2*>(raw.get());
    if (idmap == nullptr) return Status::Corruption(path + " is not a dtrain index (no IndexIDMap2)");
    raw.release();
    vi->f_->index.reset(idmap);
    return Status::OK();
  });
  if (!st.ok()) return Status::Corruption(st.message());
  faiss::Index* inner = vi->f_->index->index;
  IndexConfig::Kind kind;
  if (dynamic_cast<faiss::IndexHNSW*>(inner)) kind = IndexConfig::HNSW;
  else if (dynamic_cast<faiss::IndexIVF*>(inner)) kind = IndexConfig::IVF;
  else if (dynamic_cast<faiss::IndexFlat*>(inner)) kind = IndexConfig::FLAT;
  else return Status::Corruption(path + ": unexpected FAISS index type");
  if (kind != params.kind()) {
    return Status::Corruption(path + " holds a " + IndexKindName(kind) + " index but the manifest says " +
                              IndexKindName(params.kind()));
  }
  if (inner->metric_type != faiss::METRIC_INNER_PRODUCT) {
    return Status::Corruption(path + ": the index does not use inner product");
  }
  vi->kind_ = kind;
  vi->dim_ = static_cast<int>(vi->f_->index->d);
  vi->params_ = params;
  DTRAIN_RETURN_IF_ERROR(Guard("setting search parameters", [&] { return vi->ApplySearchParams(params); }));
  *out = std::move(vi);
  return Status::OK();
}

Status VectorIndex::Save(const std::string& path) const {
  return Guard("writing " + path, [&]() -> Status {
    faiss::write_index(f_->index.get(), path.c_str());
    return Status::OK();
  });
}

Status VectorIndex::Search(const float* queries, int64_t n, int k, std::vector<float>* scores,
                           std::vector<int64_t>* ids, int hnsw_ef_search) const {
  if (k < 1) return Status::InvalidArgument("k must be >= 1, got " + std::to_string(k));
  scores->assign(static_cast<size_t>(n) * k, 0.f);
  ids->assign(static_cast<size_t>(n) * k, -1);
  if (n == 0) return Status::OK();
  static_assert(sizeof(faiss::Index::idx_t) == sizeof(int64_t), "FAISS ids are 64-bit");
  return Guard("searching", [&]() -> Status {
    auto* out_ids = reinterpret_cast<faiss::Index::idx_t*>(ids->data());
    auto* hnsw = dynamic_cast<const faiss::IndexHNSW*>(f_->index->index);
    if (hnsw != nullptr && hnsw_ef_search > 0) {
      // Per call, so concurrent searches with other settings stay unaffected.
      // The inner index is searched and its labels mapped here, which does not
      // depend on whether the id map passes parameters down.
      faiss::SearchParametersHNSW p;
      p.efSearch = hnsw_ef_search;
      hnsw->search(n, queries, k, scores->data(), out_ids, &p);
      const auto& id_map = f_->index->id_map;
      for (size_t i = 0; i < ids->size(); ++i) {
        if ((*ids)[i] >= 0) (*ids)[i] = id_map[static_cast<size_t>((*ids)[i])];
      }
    } else {
      f_->index->search(n, queries, k, scores->data(), out_ids);
    }
    return Status::OK();
  });
}

Status VectorIndex::ReconstructAll(std::vector<float>* vectors, std::vector<int64_t>* ids) const {
  return Guard("reading the vectors back", [&]() -> Status {
    const int64_t n = size();
    vectors->resize(static_cast<size_t>(n) * dim_);
    ids->assign(f_->index->id_map.begin(), f_->index->id_map.end());
    for (int64_t i = 0; i < n; ++i) f_->index->index->reconstruct(i, vectors->data() + i * dim_);
    return Status::OK();
  });
}

std::string VectorIndex::Describe() const {
  std::string s = IndexKindName(kind_);
  if (kind_ == IndexConfig::HNSW) {
    s += " (M " + std::to_string(params_.hnsw_m()) + ", efConstruction " + std::to_string(params_.hnsw_ef_construction()) +
         ", efSearch " + std::to_string(params_.hnsw_ef_search()) + ")";
  } else if (kind_ == IndexConfig::IVF) {
    s += " (nlist " + std::to_string(params_.ivf_nlist()) + ", nprobe " + std::to_string(params_.ivf_nprobe()) + ")";
  }
  return s + ", " + std::to_string(size()) + " vectors of " + std::to_string(dim_);
}

}  // namespace dtrain::indexer
