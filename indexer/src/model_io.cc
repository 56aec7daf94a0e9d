#include "model_io.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "dtrain/common/config.h"
#include "dtrain/common/crc32c.h"
#include "dtrain/common/progress.h"
#include "dtrain/models/registry.h"
#include "dtrain/worker/evaluation.h"
#include "dtrain/worker/trainer.h"

namespace dtrain::indexer::internal {
namespace fs = std::filesystem;

Status LoadModelSource(const std::string& source, bool from_checkpoint, LoadedModel* out) {
  std::error_code ec;
  if (source.empty()) return Status::InvalidArgument("no model given (a run directory or a model file)");
  if (!fs::exists(source, ec)) return Status::NotFound("model " + source + " does not exist");
  LoadedModel m;
  std::string model_file;
  bool use_checkpoint = false;
  std::string store_dir;
  if (fs::is_directory(source, ec)) {
    const fs::path run(source);
    const fs::path config_path = run / "config.textproto";
    if (!fs::exists(config_path)) {
      return Status::NotFound(source + " is not a run directory (no config.textproto) and not a model file");
    }
    JobConfig job;
    DTRAIN_RETURN_IF_ERROR(LoadJobConfig(config_path.string(), {}, &job));
    m.config = job.model();
    m.job_name = job.name();
    model_file = (run / "model.pt").string();
    store_dir = job.checkpoint().dir().empty() ? (run / "store").string() : job.checkpoint().dir();
    if (!fs::path(store_dir).is_absolute() && !fs::exists(store_dir)) store_dir = (run / "store").string();
    use_checkpoint = from_checkpoint || !fs::exists(model_file);
    if (use_checkpoint && !fs::exists(store_dir)) {
      return Status::NotFound(source + " has neither model.pt nor a checkpoint store (" + store_dir +
                              "): has the job trained?");
    }
  } else {
    if (from_checkpoint) return Status::InvalidArgument("--checkpoint needs a run directory, not the file " + source);
    model_file = source;
    Status st = worker::ReadModelConfig(model_file, &m.config);
    if (st.code() == Status::Code::kNotFound) {
      // A model file without its config: look for the run's config beside it.
      const fs::path beside = fs::path(source).parent_path() / "config.textproto";
      if (!fs::exists(beside)) {
        return Status::FailedPrecondition(source + " carries no model config and has no config.textproto beside "
                                          "it; give its run directory instead");
      }
      JobConfig job;
      DTRAIN_RETURN_IF_ERROR(LoadJobConfig(beside.string(), {}, &job));
      m.config = job.model();
      m.job_name = job.name();
    } else {
      DTRAIN_RETURN_IF_ERROR(st);
    }
  }
  DTRAIN_RETURN_IF_ERROR(models::BuildEmbedder(m.config, &m.model));
  if (use_checkpoint) {
    int64_t step = 0;
    std::vector<std::string> warnings;
    DTRAIN_RETURN_IF_ERROR(worker::LoadModelFromCheckpoint(store_dir, *m.model, &step, &warnings));
    for (const std::string& w : warnings) spdlog::warn("{}", w);
    m.description = store_dir + " checkpoint " + std::to_string(step);
  } else {
    DTRAIN_RETURN_IF_ERROR(worker::LoadModel(model_file, *m.model));
    m.description = model_file;
  }
  m.model->eval();
  *out = std::move(m);
  return Status::OK();
}

Status EmbedImages(models::EmbedderImpl& model, const data::Dataset& images, int64_t batch_size, bool progress,
                   const std::string& label, std::vector<float>* out) {
  const int64_t n = images.size;
  const int64_t dim = model.embedding_dim();
  if (batch_size < 1) return Status::InvalidArgument("batch size must be >= 1");
  out->assign(static_cast<size_t>(n * dim), 0.f);
  std::unique_ptr<ProgressBar> bar;
  if (progress) {
    ProgressOptions po;
    po.label = label;
    po.total = n;
    bar = std::make_unique<ProgressBar>(po);
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto on_batch = [&](int64_t done) {
    if (!bar) return;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    char rate[32];
    std::snprintf(rate, sizeof rate, "%.0f", static_cast<double>(done) / std::max(s, 1e-9));
    bar->Update(done, {{"img/s", rate}});
  };
  try {
    torch::Tensor emb = worker::EmbedDataset(model, images, batch_size, {}, on_batch);
    // Unit rows (the model normalises already; this keeps a zero row zero).
    emb = torch::nn::functional::normalize(emb, torch::nn::functional::NormalizeFuncOptions().dim(1)).contiguous();
    std::memcpy(out->data(), emb.data_ptr<float>(), sizeof(float) * static_cast<size_t>(n * dim));
  } catch (const c10::Error& e) {
    return Status::Internal("embedding " + images.source + ": " + e.what_without_backtrace());
  }
  if (bar) bar->Finish();
  return Status::OK();
}

void UseThreads(int threads) {
  const int n = threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  torch::set_num_threads(n);
}

Status FileDigest(const std::string& path, std::string* digest) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError("cannot open " + path);
  uint32_t crc = 0;
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    crc = crc32c::Extend(crc, buf.data(), static_cast<size_t>(in.gcount()));
  }
  if (in.bad()) return Status::IOError("cannot read " + path);
  char hex[16];
  std::snprintf(hex, sizeof hex, "%08x", crc);
  *digest = hex;
  return Status::OK();
}

Status WriteIndexModel(const std::string& dir, LoadedModel& model, int embedding_dim,
                       const IndexConfig& effective, IndexManifest* manifest) {
  const std::string model_path = dir + "/model.pt";
  DTRAIN_RETURN_IF_ERROR(worker::SaveModel(*model.model, model.config, model_path));
  IndexManifest m;
  m.set_format_version(1);
  m.set_model_source(model.description);
  DTRAIN_RETURN_IF_ERROR(FileDigest(model_path, m.mutable_model_digest()));
  *m.mutable_model() = model.config;
  m.set_embedding_dim(embedding_dim);
  *m.mutable_params() = effective;
  m.mutable_params()->clear_output_dir();
  m.mutable_params()->clear_builder_address();
  *manifest = m;
  return Status::OK();
}

}  // namespace dtrain::indexer::internal
