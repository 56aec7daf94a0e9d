#include "dtrain/indexer/index_builder.h"

#include <google/protobuf/text_format.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "dtrain/common/metrics_log.h"
#include "dtrain/common/rpc.h"
#include "dtrain/indexer.grpc.pb.h"
#include "dtrain/indexer/gallery.h"
#include "dtrain/indexer/metadata_store.h"
#include "dtrain/indexer/vector_index.h"
#include "dtrain/worker/trainer.h"
#include "model_io.h"
#include "index_dir.h"

namespace dtrain::indexer {
namespace fs = std::filesystem;

namespace {

double Since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

using internal::DirCleanup;

}  // namespace

bool IsIndexDir(const std::string& dir) {
  std::error_code ec;
  return fs::is_regular_file(fs::path(dir) / "manifest.textproto", ec);
}

Status ReadIndexManifest(const std::string& dir, IndexManifest* manifest) {
  const std::string path = (fs::path(dir) / "manifest.textproto").string();
  std::error_code ec;
  if (!fs::exists(dir, ec)) return Status::NotFound("index directory " + dir + " does not exist");
  if (!fs::is_regular_file(path, ec)) {
    return Status::NotFound(dir + " is not an index (no manifest.textproto; a build that did not finish leaves none)");
  }
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  if (!in) return Status::IOError("cannot read " + path);
  IndexManifest m;
  if (!google::protobuf::TextFormat::ParseFromString(ss.str(), &m)) return Status::Corruption(path + " does not parse");
  if (m.format_version() != 1) {
    return Status::FailedPrecondition(path + ": index format " + std::to_string(m.format_version()) +
                                      " is not supported by this dtrain (1)");
  }
  *manifest = m;
  return Status::OK();
}

std::string DescribeManifest(const IndexManifest& m) {
  return std::string(IndexKindName(m.params().kind())) + " index of " + std::to_string(m.count()) + " images (" +
         m.gallery_description() + "), dim " + std::to_string(m.embedding_dim()) + ", model " + m.model_digest() +
         (m.job_name().empty() ? "" : " of job " + m.job_name());
}

Status BuildIndex(const BuildIndexOptions& o, IndexManifest* manifest_out) {
  if (o.output_dir.empty()) return Status::InvalidArgument("no output directory for the index");
  const std::string out = fs::path(o.output_dir).lexically_normal().string();
  std::error_code ec;
  if (fs::exists(out, ec) && !IsIndexDir(out) && !fs::is_empty(out, ec)) {
    return Status::FailedPrecondition(out + " exists and is not a dtrain index; it will not be replaced");
  }
  // 1. The model.
  const auto t_start = std::chrono::steady_clock::now();
  internal::LoadedModel model;
  DTRAIN_RETURN_IF_ERROR(internal::LoadModelSource(o.model, o.from_checkpoint, &model));
  // 2. The gallery.
  GalleryOptions go;
  go.spec = o.config.gallery();
  go.limit = o.config.gallery_limit();
  go.data_dir = o.data_dir;
  Gallery gallery;
  DTRAIN_RETURN_IF_ERROR(LoadGallery(go, &gallery));
  if (gallery.images.rows != internal::kModelImageRows || gallery.images.cols != internal::kModelImageCols) {
    return Status::InvalidArgument("gallery " + gallery.description + ": the model takes " +
                                   std::to_string(internal::kModelImageRows) + "x" +
                                   std::to_string(internal::kModelImageCols) + " images");
  }
  spdlog::info("indexing {} with {} ({} dims)", gallery.description, model.description,
               model.model->embedding_dim());
  // 3. Embed.
  internal::UseThreads(o.threads);
  const auto t_embed = std::chrono::steady_clock::now();
  std::vector<float> vectors;
  DTRAIN_RETURN_IF_ERROR(internal::EmbedImages(*model.model, gallery.images, o.config.embed_batch_size(), o.progress,
                                               "embedding gallery", &vectors));
  const double embed_s = Since(t_embed);
  // 4. FAISS.
  const auto t_build = std::chrono::steady_clock::now();
  std::vector<int64_t> ids;
  ids.reserve(gallery.items.size());
  for (const ItemMeta& m : gallery.items) ids.push_back(m.id());
  std::unique_ptr<VectorIndex> index;
  IndexConfig effective;
  const int dim = static_cast<int>(model.model->embedding_dim());
  DTRAIN_RETURN_IF_ERROR(
      VectorIndex::Build(o.config, dim, vectors.data(), ids.data(), gallery.images.size, &index, &effective));
  const double build_s = Since(t_build);
  spdlog::info("built {} in {:.1f} s (embedding: {:.1f} s, {:.0f} images/s)", index->Describe(), build_s, embed_s,
               gallery.images.size / std::max(embed_s, 1e-9));
  // 5. Write into a fresh building directory.
  const std::string building = out + ".building-" + std::to_string(::getpid());
  fs::remove_all(building, ec);
  fs::create_directories(building, ec);
  if (ec) return Status::IOError("cannot create " + building + ": " + ec.message());
  DirCleanup cleanup(building);
  IndexManifest m;
  DTRAIN_RETURN_IF_ERROR(internal::WriteIndexModel(building, model, dim, effective, &m));
  m.set_gallery_description(gallery.description);
  m.set_count(gallery.images.size);
  int64_t labelled = 0;
  for (const ItemMeta& it : gallery.items) labelled += it.label() >= 0 ? 1 : 0;
  m.set_labelled(labelled);
  for (const std::string& n : gallery.label_names) m.add_label_names(n);
  m.set_image_rows(gallery.images.rows);
  m.set_image_cols(gallery.images.cols);
  m.set_created_unix(static_cast<int64_t>(std::time(nullptr)));
  m.set_embed_seconds(embed_s);
  m.set_build_seconds(build_s);
  m.set_embed_images_per_sec(gallery.images.size / std::max(embed_s, 1e-9));
  m.set_job_name(o.job_name.empty() ? model.job_name : o.job_name);
  DTRAIN_RETURN_IF_ERROR(index->Save(building + "/index.faiss"));
  {
    std::unique_ptr<MetadataStore> meta;
    DTRAIN_RETURN_IF_ERROR(MetadataStore::Create(building + "/meta", &meta));
    DTRAIN_RETURN_IF_ERROR(meta->PutAll(gallery.items));
  }
  std::string text;
  google::protobuf::TextFormat::PrintToString(m, &text);
  DTRAIN_RETURN_IF_ERROR(WriteFileAtomically(building + "/manifest.textproto",
                                             "# dtrain index manifest (proto/dtrain/indexer.proto IndexManifest)\n" + text));
  // 6. Swap.
  DTRAIN_RETURN_IF_ERROR(internal::SwapIntoPlace(building, out, "index"));
  cleanup.Release();
  spdlog::info("index written to {} in {:.1f} s: {}", out, Since(t_start), DescribeManifest(m));
  if (manifest_out) *manifest_out = m;
  return Status::OK();
}

// ---- IndexBuilder implementations ---------------------------------------------------

namespace {

class LocalIndexBuilder : public IndexBuilder {
 public:
  explicit LocalIndexBuilder(bool progress) : progress_(progress) {}

  Status Build(const BuildIndexRequest& request, BuildIndexReply* reply) override {
    BuildIndexOptions o;
    o.model = request.model();
    o.from_checkpoint = request.from_checkpoint();
    o.output_dir = request.output_dir();
    o.config = request.config();
    if (request.has_data_dir()) o.data_dir = request.data_dir();
    o.job_name = request.job_name();
    o.progress = progress_;
    IndexManifest m;
    DTRAIN_RETURN_IF_ERROR(BuildIndex(o, &m));
    reply->set_index_dir(o.output_dir);
    *reply->mutable_manifest() = m;
    return Status::OK();
  }
  std::string Name() const override { return "in-process"; }

 private:
  bool progress_;
};

class RemoteIndexBuilder : public IndexBuilder {
 public:
  RemoteIndexBuilder(std::string address, std::string token, double timeout_s)
      : address_(std::move(address)), token_(std::move(token)), timeout_s_(timeout_s) {}

  Status Build(const BuildIndexRequest& request, BuildIndexReply* reply) override {
    auto channel = grpc::CreateChannel(address_, grpc::InsecureChannelCredentials());
    auto stub = dtrain::IndexBuilder::NewStub(channel);
    grpc::ClientContext ctx;
    rpc::AttachJobToken(&ctx, token_);
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(timeout_s_ * 1000)));
    return rpc::FromGrpc(stub->Build(&ctx, request, reply), "IndexBuilder.Build at " + address_);
  }
  std::string Name() const override { return "dtrain-indexer at " + address_; }

 private:
  std::string address_;
  std::string token_;
  double timeout_s_;
};

}  // namespace

std::unique_ptr<IndexBuilder> NewLocalIndexBuilder(bool progress) {
  return std::make_unique<LocalIndexBuilder>(progress);
}

std::unique_ptr<IndexBuilder> NewRemoteIndexBuilder(const std::string& address, const std::string& token,
                                                    double timeout_s) {
  return std::make_unique<RemoteIndexBuilder>(address, token, timeout_s);
}

}  // namespace dtrain::indexer
