// A loaded index answering queries: the model (to embed query images), the
// FAISS index and the metadata database of one index directory.
//
// Open checks, before serving anything: the manifest is there (a complete
// build); index/model.pt has the manifest's digest; the model's embedding
// size, the manifest's and the FAISS index's agree, and so do the counts of
// vectors and metadata. A query model given in place of the index's own
// (SearcherOptions::model) must have the same embedding size.
//
// Thread-safety: after Open every method is const and may be called from many
// threads at once (gRPC handlers do): FAISS search, eval-mode forward and
// RocksDB reads only read shared state; the dataset cache has its own mutex.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/data/fashion_mnist.h"
#include "dtrain/indexer.pb.h"

namespace dtrain::indexer {

class VectorIndex;
class MetadataStore;

struct SearcherOptions {
  std::string index_dir;
  // Embed queries with this model (run directory or model file) instead of
  // the index's own copy; its embedding size must match the index.
  std::string model;
  // Search-time parameters; <= 0 keeps the manifest's.
  int hnsw_ef_search = 0;
  int ivf_nprobe = 0;
  // Fashion-MNIST directory, for queries by dataset index.
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
  // Torch threads for embedding queries; 0 = every core.
  int threads = 0;
};

// Largest k and most images per QueryRequest.
inline constexpr int kMaxQueryK = 1000;
inline constexpr int kMaxQueriesPerRequest = 4096;

class Searcher {
 public:
  ~Searcher();

  static Status Open(const SearcherOptions& options, std::unique_ptr<Searcher>* out);

  // Embeds and searches every query of `request`. InvalidArgument (nothing
  // searched) for k outside [1, kMaxQueryK], too many queries, an image that
  // does not decode or has the wrong size or depth, an unknown split or an
  // index past its end.
  Status Query(const QueryRequest& request, QueryReply* reply) const;

  // [n x dim] unit-row embeddings of images (of the index's image size).
  Status Embed(const data::Dataset& images, std::vector<float>* out) const;

  // Raw search of embeddings; see VectorIndex::Search.
  Status Search(const float* queries, int64_t n, int k, std::vector<float>* scores, std::vector<int64_t>* ids) const;

  // Metadata of a gallery item.
  Status Lookup(int64_t id, ItemMeta* out) const;

  // A Fashion-MNIST split, loaded once and cached.
  Status Dataset(data::Split split, const data::Dataset** out) const;

  const IndexManifest& manifest() const { return manifest_; }
  const VectorIndex& index() const { return *index_; }
  const std::string& dir() const { return options_.index_dir; }

 private:
  struct Model;
  Searcher() = default;

  SearcherOptions options_;
  IndexManifest manifest_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<VectorIndex> index_;
  std::unique_ptr<MetadataStore> meta_;
  mutable std::mutex datasets_mu_;
  mutable std::map<data::Split, std::unique_ptr<data::Dataset>> datasets_;
};

}  // namespace dtrain::indexer
