// Item metadata of an index (label, source), in a RocksDB database beside the
// FAISS file: key = the id as 8 big-endian bytes, value = ItemMeta.
//
// Thread-safety: Get may be called from many threads at once (RocksDB reads
// are thread-safe); PutAll is for the one builder thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/indexer.pb.h"

namespace rocksdb {
class DB;
}

namespace dtrain::indexer {

class MetadataStore {
 public:
  ~MetadataStore();

  // Creates a new database at `path` (it must not exist).
  static Status Create(const std::string& path, std::unique_ptr<MetadataStore>* out);
  // Opens one read-only (several processes may read one index at once).
  static Status OpenReadOnly(const std::string& path, std::unique_ptr<MetadataStore>* out);

  // Writes every item in one atomic batch, synced.
  Status PutAll(const std::vector<ItemMeta>& items);
  // NotFound for an unknown id; Corruption for a value that does not parse.
  Status Get(int64_t id, ItemMeta* out) const;
  // Number of items (a full scan).
  Status Count(int64_t* n) const;

 private:
  MetadataStore() = default;
  std::unique_ptr<rocksdb::DB> db_;
  std::string path_;
};

}  // namespace dtrain::indexer
