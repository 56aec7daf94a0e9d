#include "dtrain/coordinator/index_handoff.h"

#include <spdlog/spdlog.h>

#include <cstdio>
#include <filesystem>

#include "dtrain/common/rpc.h"
#include "dtrain/indexer/snap_index.h"
#include "dtrain/models/detector.h"
#include "dtrain/worker/detector_trainer.h"

namespace dtrain::coordinator {
namespace fs = std::filesystem;

BuildIndexRequest HandoffRequest(const JobConfig& config) {
  BuildIndexRequest req;
  req.set_model(fs::absolute(config.run_dir()).lexically_normal().string());
  const std::string out = config.index().output_dir().empty() ? config.run_dir() + "/index" : config.index().output_dir();
  req.set_output_dir(fs::absolute(out).lexically_normal().string());
  *req.mutable_config() = config.index();
  req.set_job_name(config.name());
  req.set_data_dir(config.data().dir());
  req.set_serve(true);
  return req;
}

Status HandOffToIndexer(const JobConfig& config, indexer::IndexBuilder& builder, IndexManifest* manifest) {
  const BuildIndexRequest req = HandoffRequest(config);
  spdlog::info("job {} completed: handing the model to the index builder ({}) for a {} index of {}", config.name(),
               builder.Name(), IndexConfig::Kind_Name(config.index().kind()), config.index().gallery());
  BuildIndexReply reply;
  Status st = builder.Build(req, &reply);
  if (!st.ok()) {
    return st.WithContext("index hand-off of job " + config.name() + " to " + builder.Name() +
                          " (training completed and its model is saved; retry with `dtrain index build " +
                          config.run_dir() + "`)");
  }
  spdlog::info("index ready in {}: {}", reply.index_dir(), indexer::DescribeManifest(reply.manifest()));
  if (manifest) *manifest = reply.manifest();
  return Status::OK();
}

Status MakeIndexBuilder(const JobConfig& config, bool progress, std::unique_ptr<indexer::IndexBuilder>* out) {
  const std::string& address = config.index().builder_address();
  if (address.empty()) {
    *out = indexer::NewLocalIndexBuilder(progress);
    return Status::OK();
  }
  std::string token;
  Status st = rpc::LoadJobToken("", &token);
  if (!st.ok()) return st.WithContext("index.builder_address " + address);
  *out = indexer::NewRemoteIndexBuilder(address, token);
  return Status::OK();
}

Status HandOffSnapIndex(const JobConfig& config, bool progress, std::string* summary) {
  const IndexConfig& ic = config.index();
  if (ic.snap_embedder().empty()) {
    spdlog::info("job {} completed: no snap index (index.snap_embedder names no embedder run)", config.name());
    return Status::OK();
  }
  indexer::SnapIndexOptions o;
  o.snap_dir = ic.snap_gallery();
  if (o.snap_dir.empty()) {
    // The job's evaluation snaps, written out so that the index can show them.
    o.snap_dir = config.run_dir() + "/snaps";
    std::vector<data::Snap> snaps;
    DTRAIN_RETURN_IF_ERROR(worker::LoadEvalSnaps(config, &snaps));
    DTRAIN_RETURN_IF_ERROR(data::WriteSnapDirectory(o.snap_dir, snaps, models::DetectorCategories(config.model())));
  }
  o.detector = config.run_dir();
  o.embedder = ic.snap_embedder();
  o.output_dir = ic.output_dir().empty() ? config.run_dir() + "/index" : ic.output_dir();
  o.progress = progress;
  spdlog::info("job {} completed: building the snap index of {} with the embedder of {}", config.name(), o.snap_dir,
               o.embedder);
  indexer::SnapIndexSummary s;
  Status st = indexer::BuildSnapIndex(o, &s);
  if (!st.ok()) {
    return st.WithContext("snap index hand-off of job " + config.name() +
                          " (training completed and its model is saved; retry with `dtrain snap index build`)");
  }
  *summary = "snap index of " + std::to_string(s.snaps) + " snaps, " + std::to_string(s.items) + " items in " +
             o.output_dir;
  std::printf("index: %s\n", summary->c_str());
  std::fflush(stdout);
  return Status::OK();
}

HandOffFn IndexHandOff(bool progress) {
  return [progress](const JobConfig& config, std::string* summary) -> Status {
    if (!config.index().build_at_end()) return Status::OK();
    if (models::IsDetectorModel(config.model().name())) return HandOffSnapIndex(config, progress, summary);
    std::unique_ptr<indexer::IndexBuilder> builder;
    DTRAIN_RETURN_IF_ERROR(MakeIndexBuilder(config, progress, &builder));
    IndexManifest manifest;
    DTRAIN_RETURN_IF_ERROR(HandOffToIndexer(config, *builder, &manifest));
    *summary = indexer::DescribeManifest(manifest);
    std::printf("index: %s\n", summary->c_str());
    std::fflush(stdout);
    return Status::OK();
  };
}

}  // namespace dtrain::coordinator
