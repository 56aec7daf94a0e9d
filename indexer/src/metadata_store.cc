#include "dtrain/indexer/metadata_store.h"

#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include <filesystem>

namespace dtrain::indexer {
namespace {

std::string Key(int64_t id) {
  std::string k(8, '\0');
  const uint64_t u = static_cast<uint64_t>(id);
  for (int i = 0; i < 8; ++i) k[i] = static_cast<char>((u >> (56 - 8 * i)) & 0xff);
  return k;
}

Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return Status::OK();
  if (s.IsNotFound()) return Status::NotFound(what + ": " + s.ToString());
  if (s.IsCorruption()) return Status::Corruption(what + ": " + s.ToString());
  return Status::IOError(what + ": " + s.ToString());
}

}  // namespace

MetadataStore::~MetadataStore() = default;

Status MetadataStore::Create(const std::string& path, std::unique_ptr<MetadataStore>* out) {
  if (std::filesystem::exists(path)) return Status::AlreadyExists("metadata database " + path + " already exists");
  rocksdb::Options options;
  options.create_if_missing = true;
  options.error_if_exists = true;
  rocksdb::DB* db = nullptr;
  DTRAIN_RETURN_IF_ERROR(FromRocks(rocksdb::DB::Open(options, path, &db), "creating " + path));
  std::unique_ptr<MetadataStore> s(new MetadataStore());
  s->db_.reset(db);
  s->path_ = path;
  *out = std::move(s);
  return Status::OK();
}

Status MetadataStore::OpenReadOnly(const std::string& path, std::unique_ptr<MetadataStore>* out) {
  if (!std::filesystem::is_directory(path)) return Status::NotFound("metadata database " + path + " does not exist");
  rocksdb::Options options;
  options.create_if_missing = false;
  rocksdb::DB* db = nullptr;
  DTRAIN_RETURN_IF_ERROR(FromRocks(rocksdb::DB::OpenForReadOnly(options, path, &db), "opening " + path));
  std::unique_ptr<MetadataStore> s(new MetadataStore());
  s->db_.reset(db);
  s->path_ = path;
  *out = std::move(s);
  return Status::OK();
}

Status MetadataStore::PutAll(const std::vector<ItemMeta>& items) {
  rocksdb::WriteBatch batch;
  std::string value;
  for (const ItemMeta& m : items) {
    value.clear();
    m.SerializeToString(&value);
    batch.Put(Key(m.id()), value);
  }
  rocksdb::WriteOptions wo;
  wo.sync = true;
  DTRAIN_RETURN_IF_ERROR(FromRocks(db_->Write(wo, &batch), "writing metadata to " + path_));
  return FromRocks(db_->Flush(rocksdb::FlushOptions()), "flushing " + path_);
}

Status MetadataStore::Get(int64_t id, ItemMeta* out) const {
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), Key(id), &value);
  if (s.IsNotFound()) return Status::NotFound("no metadata for id " + std::to_string(id) + " in " + path_);
  DTRAIN_RETURN_IF_ERROR(FromRocks(s, "reading id " + std::to_string(id) + " from " + path_));
  if (!out->ParseFromString(value)) {
    return Status::Corruption(path_ + ": the metadata of id " + std::to_string(id) + " does not parse");
  }
  return Status::OK();
}

Status MetadataStore::Count(int64_t* n) const {
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  int64_t c = 0;
  for (it->SeekToFirst(); it->Valid(); it->Next()) ++c;
  DTRAIN_RETURN_IF_ERROR(FromRocks(it->status(), "scanning " + path_));
  *n = c;
  return Status::OK();
}

}  // namespace dtrain::indexer
