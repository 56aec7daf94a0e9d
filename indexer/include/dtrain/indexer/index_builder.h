// Building a retrieval index from a finished model: the end of every job.
//
// BuildIndex, as numbered steps:
//  1. Load the model: a run directory's model.pt (or, when asked or when it
//     has none, the newest good checkpoint of its store), or a model file
//     written by dtrain (it carries its ModelConfig).
//  2. Load the gallery (gallery.h); its images must be the model's 28x28.
//  3. Embed it in batches on all cores (torch intra-op threads), with a
//     progress bar; rows are L2-normalised.
//  4. Build the FAISS index (vector_index.h) with the gallery's stable ids.
//  5. Write everything into a fresh sibling directory "<out>.building-<pid>":
//     model.pt (the model, with its config), index.faiss, meta/ (RocksDB,
//     id -> ItemMeta), and manifest.textproto last.
//  6. Swap it into place: an existing <out> is renamed away, the new one
//     renamed to <out>, the old one removed. A failure at any step removes the
//     building directory, so <out> is either the previous index or the new
//     one, never half of one; readers (searcher.h) insist on the manifest.
//
// IndexBuilder is the hand-off seam the coordinator calls when a job
// completes: LocalIndexBuilder runs BuildIndex in-process;
// RemoteIndexBuilder asks a dtrain-indexer service over gRPC.
#pragma once

#include <memory>
#include <string>

#include "dtrain/common/status.h"
#include "dtrain/indexer.pb.h"

namespace dtrain::indexer {

struct BuildIndexOptions {
  // Run directory or model file (step 1).
  std::string model;
  // Use the newest good checkpoint even when the run has a model.pt.
  bool from_checkpoint = false;
  // The index directory to write.
  std::string output_dir;
  // kind, parameters, gallery, gallery_limit, embed_batch_size.
  IndexConfig config;
  // Fashion-MNIST directory for fashion_mnist:* galleries.
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
  // Recorded in the manifest (default: the run's job name, when known).
  std::string job_name;
  bool progress = true;
  // Torch threads for embedding; 0 = every core.
  int threads = 0;
};

// Steps 1-6. On success `*manifest` (may be null) is the manifest written.
// Errors name what is wrong: a missing model, an unreadable or empty
// gallery, images of the wrong size or depth, an output path that exists
// and is not an index.
Status BuildIndex(const BuildIndexOptions& options, IndexManifest* manifest);

// True when `dir` holds a manifest (a complete index).
bool IsIndexDir(const std::string& dir);

// Reads <dir>/manifest.textproto. NotFound when the directory holds no index.
Status ReadIndexManifest(const std::string& dir, IndexManifest* manifest);

// "HNSW index of 60000 images (fashion_mnist:train ...), dim 128, model <digest>".
std::string DescribeManifest(const IndexManifest& manifest);

// ---- the hand-off seam -----------------------------------------------------------

class IndexBuilder {
 public:
  virtual ~IndexBuilder() = default;
  // Builds request.config's index for request.model into request.output_dir.
  virtual Status Build(const BuildIndexRequest& request, BuildIndexReply* reply) = 0;
  // "in-process" or "dtrain-indexer at HOST:PORT".
  virtual std::string Name() const = 0;
};

// Runs BuildIndex in this process.
std::unique_ptr<IndexBuilder> NewLocalIndexBuilder(bool progress);

// Calls IndexBuilder.Build of the dtrain-indexer at `address` with `token`;
// `timeout_s` bounds the whole build.
std::unique_ptr<IndexBuilder> NewRemoteIndexBuilder(const std::string& address, const std::string& token,
                                                    double timeout_s = 3600);

}  // namespace dtrain::indexer
