// dtrain-indexer: the IndexBuilder gRPC service (proto/dtrain/indexer.proto).
//
// It serves at most one index at a time. Build and Load replace it: the new
// Searcher is opened completely, then swapped in under a mutex; queries hold
// a shared_ptr to the Searcher they started with, so a swap never cuts one
// short, and concurrent queries run in parallel on gRPC's thread pool. Builds
// are serialised (one at a time).
//
// Every handler checks the job token first (common/rpc.h); bad requests get
// INVALID_ARGUMENT / NOT_FOUND with the reason and change nothing.
#pragma once

#include <memory>
#include <string>

#include "dtrain/common/status.h"

namespace dtrain::indexer {

struct IndexerServerOptions {
  std::string bind_address = "127.0.0.1";
  int port = 0;  // 0: pick a free port (see IndexerServer::port)
  std::string token;
  // An index directory to serve from the start (optional).
  std::string index_dir;
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
  // Torch threads for embedding (0 = every core).
  int threads = 0;
  // Largest request accepted (query images travel inside it).
  int max_message_bytes = 64 << 20;
};

class IndexerServer {
 public:
  ~IndexerServer();
  static Status Start(const IndexerServerOptions& options, std::unique_ptr<IndexerServer>* out);
  int port() const;
  // Stops accepting calls; calls in flight get up to 5 s to finish.
  void Shutdown();

 private:
  struct Impl;
  IndexerServer() = default;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dtrain::indexer
