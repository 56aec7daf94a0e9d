// A FAISS index of unit-norm embeddings searched by inner product (cosine),
// with stable 64-bit ids (faiss::IndexIDMap2 around one of):
//   FLAT  exact search (IndexFlatIP);
//   HNSW  IndexHNSWFlat(M, efConstruction; efSearch at search time);
//   IVF   IndexIVFFlat over nlist k-means cells of the gallery, nprobe of them
//         visited per query. nlist is capped at the number of vectors.
//
// FAISS exceptions never leave this class: they come back as Status.
//
// Thread-safety: Search and ReconstructAll are const and may run from many
// threads at once (FAISS search only reads the index); Build, Load and Save
// are for one thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/job.pb.h"

namespace dtrain::indexer {

class VectorIndex {
 public:
  ~VectorIndex();
  VectorIndex(const VectorIndex&) = delete;
  VectorIndex& operator=(const VectorIndex&) = delete;

  // Builds params.kind() over `n` vectors of `dim` floats (row-major) with
  // the given ids. `*effective` (may be null) receives the parameters really
  // used (nlist after capping). InvalidArgument for n == 0, dim < 1 or
  // repeated ids.
  static Status Build(const IndexConfig& params, int dim, const float* vectors, const int64_t* ids, int64_t n,
                      std::unique_ptr<VectorIndex>* out, IndexConfig* effective = nullptr);

  // Reads an index written by Save; efSearch and nprobe are taken from
  // `params`. Corruption when FAISS cannot read the file or it is not an
  // index of this kind.
  static Status Load(const std::string& path, const IndexConfig& params, std::unique_ptr<VectorIndex>* out);

  Status Save(const std::string& path) const;

  // Top-k of `n` queries: row-major [n x k] scores (best first) and ids; -1
  // ids (score -inf) where the index found fewer than k. `hnsw_ef_search`
  // > 0 overrides efSearch for this call only (HNSW returns at most about
  // efSearch results, so a search for k far above it needs efSearch >= k).
  Status Search(const float* queries, int64_t n, int k, std::vector<float>* scores, std::vector<int64_t>* ids,
                int hnsw_ef_search = 0) const;

  // Every stored vector ([size x dim], row-major) with its id, in insertion
  // order.
  Status ReconstructAll(std::vector<float>* vectors, std::vector<int64_t>* ids) const;

  int dim() const { return dim_; }
  int64_t size() const;
  IndexConfig::Kind kind() const { return kind_; }
  // "HNSW (M 32, efConstruction 200, efSearch 128), 60000 vectors of 128".
  std::string Describe() const;

 private:
  VectorIndex();
  Status ApplySearchParams(const IndexConfig& params);

  struct Faiss;  // the faiss::IndexIDMap2 (a template alias: not forward-declarable)
  std::unique_ptr<Faiss> f_;
  IndexConfig params_;
  IndexConfig::Kind kind_ = IndexConfig::FLAT;
  int dim_ = 0;
};

// "flat", "hnsw", "ivf" <-> IndexConfig::Kind (case-insensitive).
bool ParseIndexKind(const std::string& name, IndexConfig::Kind* kind);
const char* IndexKindName(IndexConfig::Kind kind);

}  // namespace dtrain::indexer
