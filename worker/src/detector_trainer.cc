#include "dtrain/worker/detector_trainer.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "dtrain/common/checkpoint_store.h"
#include "dtrain/common/config.h"
#include "dtrain/common/lr_schedule.h"
#include "dtrain/common/metrics_log.h"
#include "dtrain/common/progress.h"
#include "dtrain/data/draw.h"
#include "dtrain/data/sampler.h"
#include "dtrain/worker/checkpointing.h"
#include "torch_guard.h"

namespace dtrain::worker {
namespace {

using Clock = std::chrono::steady_clock;
using internal::Guard;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

data::SnapOptions SnapOptionsOf(const JobConfig& config, uint64_t seed) {
  const SnapConfig& s = config.data().snaps();
  data::SnapOptions o;
  o.canvas = s.canvas();
  o.min_items = s.min_items();
  o.max_items = s.max_items();
  o.min_scale = s.min_scale();
  o.max_scale = s.max_scale();
  o.max_overlap = s.max_overlap();
  o.seed = seed;
  return o;
}

Status LoadSplit(const JobConfig& config, data::Split split, data::Dataset* out) {
  data::FashionMnistOptions fo;
  fo.dir = config.data().dir();
  fo.split = split;
  fo.limit = split == data::Split::kTrain ? config.data().train_limit() : config.data().test_limit();
  return data::LoadFashionMnist(fo, out);
}

// The snaps of a COCO directory, checked against the detector's categories
// (the file's category names, in id order, must be the config's).
Status LoadSnapDir(const JobConfig& config, const std::string& dir, std::vector<data::Snap>* snaps) {
  std::vector<std::string> categories;
  DTRAIN_RETURN_IF_ERROR(data::ReadSnapDirectory(dir, /*load_pixels=*/true, snaps, &categories));
  const std::vector<std::string> want = models::DetectorCategories(config.model());
  if (categories != want) {
    std::string have, need;
    for (const auto& c : categories) have += (have.empty() ? "" : ", ") + c;
    for (const auto& c : want) need += (need.empty() ? "" : ", ") + c;
    return Status::InvalidArgument(dir + "/annotations.json has categories [" + have +
                                   "] but model.detector.categories is [" + need + "]");
  }
  for (const data::Snap& s : *snaps) {
    if (s.rows != config.data().snaps().canvas() || s.cols != config.data().snaps().canvas()) {
      return Status::InvalidArgument(dir + "/" + s.file_name + " is " + std::to_string(s.cols) + "x" +
                                     std::to_string(s.rows) + ", data.snaps.canvas is " +
                                     std::to_string(config.data().snaps().canvas()));
    }
  }
  return Status::OK();
}

// Where training snaps come from: generated (fresh ones every epoch) or a
// directory (the same ones every epoch).
class TrainSnaps {
 public:
  Status Open(const JobConfig& config) {
    count_ = config.data().snaps().train_count();
    if (!config.data().snaps().train_dir().empty()) {
      DTRAIN_RETURN_IF_ERROR(LoadSnapDir(config, config.data().snaps().train_dir(), &fixed_));
      count_ = static_cast<int64_t>(fixed_.size());
      return Status::OK();
    }
    DTRAIN_RETURN_IF_ERROR(LoadSplit(config, data::Split::kTrain, &source_));
    return data::SnapGenerator::Create(source_, SnapOptionsOf(config, config.seed()), &generator_)
        .WithContext("data.snaps");
  }
  int64_t count() const { return count_; }
  data::Snap Get(uint64_t epoch, int64_t index) const {
    if (!fixed_.empty()) return fixed_[static_cast<size_t>(index)];
    return generator_.Generate(static_cast<int64_t>(epoch) * count_ + index);
  }

 private:
  int64_t count_ = 0;
  data::Dataset source_;
  data::SnapGenerator generator_;
  std::vector<data::Snap> fixed_;
};

// Images and targets of a batch of snaps (all of one size).
void MakeBatch(const std::vector<data::Snap>& snaps, int num_categories, torch::Tensor* images,
               models::DetectorTargets* targets) {
  const int rows = snaps[0].rows, cols = snaps[0].cols;
  std::vector<uint8_t> pixels;
  pixels.reserve(snaps.size() * rows * cols);
  std::vector<std::vector<models::DetectorBox>> boxes(snaps.size());
  for (size_t i = 0; i < snaps.size(); ++i) {
    pixels.insert(pixels.end(), snaps[i].pixels.begin(), snaps[i].pixels.end());
    for (const data::SnapItem& it : snaps[i].items) {
      boxes[i].push_back({it.box.x0, it.box.y0, it.box.x1, it.box.y1, it.category, 1.0f});
    }
  }
  *images = models::SnapPixelsToTensor(pixels.data(), static_cast<int64_t>(snaps.size()), rows, cols);
  *targets = models::BuildDetectorTargets(boxes, num_categories, rows / models::kDetectorStride,
                                          cols / models::kDetectorStride);
}

nlohmann::ordered_json MetricsJson(const DetectionMetrics& m) {
  nlohmann::ordered_json j;
  j["images"] = m.images;
  j["mean_ap50"] = m.mean_ap50;
  j["mean_ap75"] = m.mean_ap75;
  j["mean_ap"] = m.mean_ap;
  nlohmann::ordered_json per = nlohmann::ordered_json::object();
  for (size_t c = 0; c < m.categories.size(); ++c) {
    per[m.categories[c]] = {{"ap50", m.ap50[c]},
                            {"ap75", m.ap75[c]},
                            {"ap", m.ap[c]},
                            {"ground_truth", m.ground_truth[c]},
                            {"detections", m.detections[c]}};
  }
  j["per_category"] = per;
  return j;
}

}  // namespace

Status LoadEvalSnaps(const JobConfig& config, std::vector<data::Snap>* snaps) {
  if (!config.data().snaps().eval_dir().empty()) return LoadSnapDir(config, config.data().snaps().eval_dir(), snaps);
  data::Dataset test;
  DTRAIN_RETURN_IF_ERROR(LoadSplit(config, data::Split::kTest, &test));
  data::SnapGenerator gen;
  DTRAIN_RETURN_IF_ERROR(
      data::SnapGenerator::Create(test, SnapOptionsOf(config, config.data().snaps().eval_seed()), &gen)
          .WithContext("data.snaps"));
  snaps->clear();
  snaps->reserve(static_cast<size_t>(config.data().snaps().eval_count()));
  for (int64_t i = 0; i < config.data().snaps().eval_count(); ++i) snaps->push_back(gen.Generate(i));
  return Status::OK();
}

std::vector<std::vector<models::DetectorBox>> Detect(models::CenterNetImpl& model, const std::vector<data::Snap>& snaps,
                                                     int top_k, float threshold, int batch) {
  torch::NoGradGuard no_grad;
  const bool was_training = model.is_training();
  model.eval();
  std::vector<std::vector<models::DetectorBox>> out;
  out.reserve(snaps.size());
  std::vector<uint8_t> pixels;
  for (size_t begin = 0; begin < snaps.size(); begin += static_cast<size_t>(batch)) {
    const size_t end = std::min(snaps.size(), begin + static_cast<size_t>(batch));
    const int rows = snaps[begin].rows, cols = snaps[begin].cols;
    pixels.clear();
    for (size_t i = begin; i < end; ++i) pixels.insert(pixels.end(), snaps[i].pixels.begin(), snaps[i].pixels.end());
    torch::Tensor images = models::SnapPixelsToTensor(pixels.data(), static_cast<int64_t>(end - begin), rows, cols);
    for (auto& d : models::DecodeDetections(model.forward(images), top_k, threshold)) out.push_back(std::move(d));
  }
  if (was_training) model.train();
  return out;
}

DetectionMetrics EvaluateDetector(models::CenterNetImpl& model, const std::vector<std::string>& categories,
                                  const std::vector<data::Snap>& snaps, int top_k) {
  // A threshold of 0.01 keeps the low-scoring tail that AP integrates over.
  const auto found = Detect(model, snaps, top_k, 0.01f);
  std::vector<ScoredDetection> dets;
  std::vector<GroundTruthBox> truth;
  for (size_t i = 0; i < snaps.size(); ++i) {
    for (const auto& d : found[i]) dets.push_back({static_cast<int64_t>(i), d.category, {d.x0, d.y0, d.x1, d.y1}, d.score});
    for (const auto& it : snaps[i].items) {
      truth.push_back({static_cast<int64_t>(i), it.category, {it.box.x0, it.box.y0, it.box.x1, it.box.y1}});
    }
  }
  return EvaluateDetections(dets, truth, categories, static_cast<int64_t>(snaps.size()));
}

Status WriteDetectionPicture(models::CenterNetImpl& model, const std::vector<data::Snap>& snaps_in, int count,
                             float min_score, const std::string& path) {
  const std::vector<data::Snap> snaps(snaps_in.begin(), snaps_in.begin() + std::min<size_t>(snaps_in.size(), count));
  if (snaps.empty()) return Status::InvalidArgument("a detection picture needs at least one snap");
  const auto found = Detect(model, snaps, 100, min_score);
  constexpr int kColumns = 4, kGap = 6;
  const int rows = snaps[0].rows, cols = snaps[0].cols;
  const int n = static_cast<int>(snaps.size());
  const int grid_rows = (n + kColumns - 1) / kColumns, grid_cols = std::min(n, kColumns);
  const uint8_t background[3] = {40, 40, 40}, truth[3] = {0, 220, 0}, detected[3] = {255, 40, 40};
  data::RgbImage picture;
  data::RgbCanvas::Reset(&picture, kGap + grid_rows * (rows + kGap), kGap + grid_cols * (cols + kGap), background);
  data::RgbCanvas canvas(&picture);
  for (int i = 0; i < n; ++i) {
    const int y0 = kGap + (i / kColumns) * (rows + kGap), x0 = kGap + (i % kColumns) * (cols + kGap);
    data::GrayImage g;
    g.rows = snaps[i].rows;
    g.cols = snaps[i].cols;
    g.pixels = snaps[i].pixels;
    canvas.Gray(y0, x0, g);
    for (const data::SnapItem& it : snaps[i].items) canvas.Box(y0, x0, rows, cols, it.box, 1, truth);
    for (const models::DetectorBox& d : found[i]) {
      canvas.Box(y0, x0, rows, cols, data::SnapBox{d.x0, d.y0, d.x1, d.y1}, 1, detected);
    }
  }
  return data::WriteRgbPng(path, picture);
}

std::string DetectorEvalJson(const JobConfig& config, const DetectionMetrics& metrics,
                             const DetectorTrainResult* training) {
  nlohmann::ordered_json j;
  j["job"] = config.name();
  j["task"] = "detection";
  j["dataset"] = config.data().snaps().eval_dir().empty()
                     ? "fashion_mnist_snaps:test (" + std::to_string(config.data().snaps().eval_count()) +
                           " generated snaps, seed " + std::to_string(config.data().snaps().eval_seed()) + ")"
                     : config.data().snaps().eval_dir();
  j["model"] = MetricsJson(metrics);
  if (training) {
    j["training"] = {{"steps", training->steps},
                     {"seconds", training->train_seconds},
                     {"snaps_per_sec", training->images_per_sec},
                     {"final_loss", training->final_loss}};
  }
  return j.dump(2) + "\n";
}

Status LoadDetector(const std::string& path_in, models::CenterNet* out, ModelConfig* config) {
  std::string path = path_in;
  if (std::filesystem::is_directory(path)) path += "/model.pt";
  ModelConfig mc;
  DTRAIN_RETURN_IF_ERROR(ReadModelConfig(path, &mc));
  if (!models::IsDetectorModel(mc.name())) {
    return Status::InvalidArgument(path + " holds a " + mc.name() + ", not a detector (centernet_detector)");
  }
  models::CenterNet model{nullptr};
  DTRAIN_RETURN_IF_ERROR(models::BuildDetector(mc, &model));
  DTRAIN_RETURN_IF_ERROR(LoadModel(path, *model));
  model->eval();
  *out = model;
  *config = mc;
  return Status::OK();
}

Status TrainDetector(const JobConfig& config, std::unique_ptr<Strategy> strategy_in, const TrainerOptions& options,
                     DetectorTrainResult* result) {
  Strategy& strategy = *strategy_in;
  const JobConfig& cfg = config;
  if (cfg.training().threads() > 0) torch::set_num_threads(cfg.training().threads());
  torch::manual_seed(cfg.seed());

  TrainSnaps snaps;
  DTRAIN_RETURN_IF_ERROR(snaps.Open(cfg));
  const std::vector<std::string> categories = models::DetectorCategories(cfg.model());
  const int num_categories = static_cast<int>(categories.size());
  data::ShardedSampler::Options so;
  so.dataset_size = snaps.count();
  so.world_size = strategy.data_world_size();
  so.rank = strategy.data_rank();
  so.local_batch = cfg.data().batch_size();
  so.seed = cfg.seed();
  std::unique_ptr<data::ShardedSampler> sampler;
  DTRAIN_RETURN_IF_ERROR(data::ShardedSampler::Create(so, &sampler).WithContext("training snaps"));

  models::CenterNet model{nullptr};
  DTRAIN_RETURN_IF_ERROR(models::BuildDetector(cfg.model(), &model));
  std::vector<torch::Tensor> parameters = model->parameters();
  std::unique_ptr<torch::optim::Optimizer> optimizer = MakeOptimizer(cfg.optimizer(), parameters);
  const TrainingObjects objects{model.get(), nullptr, optimizer.get(), cfg.optimizer().kind()};

  const int64_t per_epoch = sampler->batches_per_epoch();
  const int64_t total_steps =
      cfg.training().max_steps() > 0 ? cfg.training().max_steps() : per_epoch * cfg.training().epochs();
  LrScheduleOptions schedule;
  schedule.schedule = cfg.schedule();
  schedule.base_lr = cfg.optimizer().lr();
  schedule.total_steps = total_steps;
  schedule.steps_per_epoch = per_epoch;

  // Resume: as the embedders' trainer (every rank reads the store, read-only,
  // before the collective Setup(); then the chief opens it for writing).
  const CheckpointConfig& ck = cfg.checkpoint();
  const bool checkpointing = ck.every_steps() > 0 || ck.every_epochs() > 0;
  StoreOptions store_options;
  store_options.path = ck.dir();
  store_options.keep_last = ck.keep_last();
  store_options.job_name = cfg.name();
  store_options.config_digest = ResumeDigest(cfg);
  store_options.force = options.force_store;
  TrainerState resume_state;
  bool resumed = false;
  if (options.resume) {
    DTRAIN_RETURN_IF_ERROR(ResumeFromStore(store_options, objects, sampler.get(), strategy.data_world_size(), per_epoch,
                                           &resume_state, &resumed));
  }

  TrainingContext context;
  for (const auto& p : model->named_parameters()) context.parameter_names.push_back("model/" + p.key());
  context.optimizer = optimizer.get();
  context.optimizer_kind = cfg.optimizer().kind();
  context.schedule = schedule;
  context.resumed = resumed;
  context.start_step = resumed ? resume_state.step() : 0;
  strategy.Attach(context);
  DTRAIN_RETURN_IF_ERROR(strategy.Setup(parameters, model->buffers()));

  std::unique_ptr<CheckpointStore> store;
  std::unique_ptr<MetricsLog> metrics;
  if (options.write_outputs && strategy.is_chief()) {
    if (checkpointing) {
      store_options.read_only = false;
      store_options.create_if_missing = true;
      DTRAIN_RETURN_IF_ERROR(CheckpointStore::Open(store_options, &store).WithContext("checkpoint store " + ck.dir()));
    }
    DTRAIN_RETURN_IF_ERROR(WriteResolvedConfig(cfg, cfg.run_dir() + "/config.textproto"));
    DTRAIN_RETURN_IF_ERROR(MetricsLog::Open(cfg.run_dir() + "/metrics.jsonl", &metrics));
  }

  int64_t step = resumed ? resume_state.step() : 0;
  const int64_t first_step = step;
  const int64_t epochs = (total_steps + per_epoch - 1) / per_epoch;
  const int64_t first_epoch = resumed ? static_cast<int64_t>(resume_state.sampler_epoch()) : 0;
  const int64_t stop_at =
      options.stop_after_steps > 0 ? std::min(options.stop_after_steps, total_steps) : total_steps;
  const bool show_progress = options.progress && cfg.training().progress_bar() && strategy.is_chief();
  const DetectorConfig& dc = cfg.model().detector();
  TrainProgress progress;
  progress.total_steps = total_steps;
  auto report = [&](const char* phase) {
    if (!options.on_progress) return;
    progress.step = step;
    progress.phase = phase;
    options.on_progress(progress);
  };
  auto checkpoint = [&](uint64_t sampler_epoch, uint64_t position) -> Status {
    report("checkpointing");
    TrainerState st;
    st.set_step(step);
    st.set_sampler_epoch(sampler_epoch);
    st.set_sampler_position(position);
    st.set_steps_per_epoch(per_epoch);
    DTRAIN_RETURN_IF_ERROR(strategy.PrepareCheckpoint());
    if (store) {
      CheckpointData data;
      DTRAIN_RETURN_IF_ERROR(Guard("checkpoint snapshot", [&] {
        return CaptureCheckpoint(cfg, strategy.name(), strategy.data_world_size(), objects, st, &data);
      }));
      DTRAIN_RETURN_IF_ERROR(store->Save(data).WithContext("checkpoint at step " + std::to_string(step)));
    }
    report("training");
    return Status::OK();
  };

  spdlog::info("training {}: {} centernet_detector ({} categories), {} step(s) = {} epoch(s) x {} step(s), batch {} x "
               "{} worker(s), {} thread(s)",
               cfg.name(), strategy.name(), num_categories, total_steps, epochs, per_epoch, cfg.data().batch_size(),
               strategy.data_world_size(), torch::get_num_threads());
  model->train();
  report("training");
  const auto run_start = Clock::now();
  auto interval_start = run_start;
  double interval_loss = 0, interval_heat = 0, interval_size = 0, interval_offset = 0, interval_data = 0;
  int64_t interval_steps = 0, interval_images = 0, total_images = 0;
  double last_loss = 0;
  bool interrupted = false;
  bool finished = false;  // strategy.Finish() called
  std::vector<int64_t> indices;
  std::vector<data::Snap> batch;
  for (int64_t epoch = first_epoch; epoch < epochs && step < total_steps && !interrupted; ++epoch) {
    // A resumed epoch continues from the restored sampler position.
    if (!(resumed && epoch == first_epoch)) sampler->StartEpoch(static_cast<uint64_t>(epoch));
    std::unique_ptr<ProgressBar> bar;
    if (show_progress) {
      ProgressOptions po;
      po.label = "epoch " + std::to_string(epoch + 1) + "/" + std::to_string(epochs);
      po.total = std::min(per_epoch, total_steps - step);
      bar = std::make_unique<ProgressBar>(po);
    }
    int64_t epoch_step = (resumed && epoch == first_epoch)
                             ? static_cast<int64_t>(resume_state.sampler_position()) / sampler->global_batch()
                             : 0;
    while (step < total_steps) {
      if (step >= stop_at) {
        interrupted = true;
        break;
      }
      const auto t0 = Clock::now();
      if (!sampler->Next(&indices)) break;
      batch.clear();
      for (int64_t i : indices) batch.push_back(snaps.Get(static_cast<uint64_t>(epoch), i));
      torch::Tensor images;
      models::DetectorTargets targets;
      MakeBatch(batch, num_categories, &images, &targets);
      const auto t1 = Clock::now();
      const double lr = LearningRate(schedule, step);
      for (auto& group : optimizer->param_groups()) group.options().set_lr(lr);
      models::DetectorLoss loss;
      DTRAIN_RETURN_IF_ERROR(Guard("training step", [&]() -> Status {
        DTRAIN_RETURN_IF_ERROR(strategy.BeginStep());
        bool recompute = true;
        while (recompute) {
          optimizer->zero_grad();
          loss = models::ComputeDetectorLoss(model->forward(images), targets, dc.size_weight(), dc.offset_weight());
          loss.total.backward();
          DTRAIN_RETURN_IF_ERROR(strategy.FinishGradients());
          if (cfg.optimizer().grad_clip_norm() > 0) {
            torch::nn::utils::clip_grad_norm_(parameters, cfg.optimizer().grad_clip_norm());
          }
          DTRAIN_RETURN_IF_ERROR(strategy.ApplyUpdate(*optimizer, &recompute));
        }
        return Status::OK();
      }).WithContext("step " + std::to_string(step)));
      const double value = loss.total.item<double>();
      if (!std::isfinite(value)) {
        return Status::Aborted("the detector's loss became " + std::to_string(value) + " at step " +
                               std::to_string(step) + "; lower optimizer.lr or set optimizer.grad_clip_norm");
      }
      ++step;
      ++epoch_step;
      ++interval_steps;
      interval_images += static_cast<int64_t>(batch.size());
      total_images += static_cast<int64_t>(batch.size());
      interval_loss += value;
      interval_heat += loss.heatmap;
      interval_size += loss.size;
      interval_offset += loss.offset;
      interval_data += Seconds(t0, t1);
      if (interval_steps >= cfg.training().log_every_steps() || step == total_steps) {
        const double secs = Seconds(interval_start, Clock::now());
        const double n = static_cast<double>(interval_steps);
        const double mean_loss = strategy.AverageAcrossWorkers(interval_loss / n);
        const double ips = static_cast<double>(interval_images) * strategy.data_world_size() / std::max(secs, 1e-9);
        last_loss = mean_loss;
        progress.loss = mean_loss;
        progress.images_per_sec = static_cast<double>(interval_images) / std::max(secs, 1e-9);
        if (metrics) {
          MetricsLog::Record rec = {{"step", static_cast<double>(step)},
                                    {"epoch", static_cast<double>(epoch) + static_cast<double>(epoch_step) /
                                                                               static_cast<double>(per_epoch)},
                                    {"loss", mean_loss},
                                    {"heatmap_loss", interval_heat / n},
                                    {"size_loss", interval_size / n},
                                    {"offset_loss", interval_offset / n},
                                    {"lr", lr},
                                    {"images_per_sec", ips},
                                    {"data_ms", 1e3 * interval_data / n},
                                    {"step_ms", 1e3 * secs / n}};
          strategy.AddStepMetrics(&rec);
          DTRAIN_RETURN_IF_ERROR(metrics->Append(rec));
        }
        if (bar) {
          char l[32], r[32], g[32];
          std::snprintf(l, sizeof l, "%.4f", mean_loss);
          std::snprintf(r, sizeof r, "%.0f", ips);
          std::snprintf(g, sizeof g, "%.4g", lr);
          bar->Update(epoch_step, {{"loss", l}, {"snaps/s", r}, {"lr", g}});
        }
        interval_loss = interval_heat = interval_size = interval_offset = interval_data = 0;
        interval_steps = interval_images = 0;
        interval_start = Clock::now();
      }
      progress.epoch = static_cast<double>(epoch) + static_cast<double>(epoch_step) / static_cast<double>(per_epoch);
      report("training");
      if (ck.every_steps() > 0 && step % ck.every_steps() == 0 && step < total_steps) {
        const data::SamplerState s = sampler->state();
        DTRAIN_RETURN_IF_ERROR(checkpoint(s.epoch, s.position));
      }
    }
    if (bar) bar->Finish();
    const bool epoch_done = !interrupted && (step % per_epoch == 0 || step == total_steps);
    if (epoch_done && (step == total_steps || (ck.every_epochs() > 0 && (epoch + 1) % ck.every_epochs() == 0))) {
      if (step == total_steps) {
        DTRAIN_RETURN_IF_ERROR(strategy.Finish());
        finished = true;
      }
      DTRAIN_RETURN_IF_ERROR(checkpoint(static_cast<uint64_t>(epoch + 1), 0));
    }
  }
  if (!finished) DTRAIN_RETURN_IF_ERROR(strategy.Finish());

  DetectorTrainResult r;
  r.steps = step;
  r.resumed_from_step = first_step;
  r.train_seconds = Seconds(run_start, Clock::now());
  r.images_per_sec = static_cast<double>(total_images) * strategy.data_world_size() / std::max(r.train_seconds, 1e-9);
  r.final_loss = last_loss;
  spdlog::info("trained {} step(s) in {:.1f} s: {:.0f} snaps/s, final loss {:.4f}", r.steps, r.train_seconds,
               r.images_per_sec, r.final_loss);
  if (!interrupted && strategy.is_chief()) {
    if (options.write_outputs) {
      DTRAIN_RETURN_IF_ERROR(SaveModel(*model, cfg.model(), cfg.run_dir() + "/model.pt"));
    }
    if (options.evaluate && cfg.eval().at_end()) {
      report("evaluating");
      std::vector<data::Snap> eval_snaps;
      DTRAIN_RETURN_IF_ERROR(LoadEvalSnaps(cfg, &eval_snaps));
      DTRAIN_RETURN_IF_ERROR(Guard("evaluation", [&]() -> Status {
        r.metrics = EvaluateDetector(*model, categories, eval_snaps, dc.max_detections());
        return Status::OK();
      }));
      r.evaluated = true;
      if (options.write_outputs) {
        DTRAIN_RETURN_IF_ERROR(WriteFileAtomically(cfg.run_dir() + "/eval.json", DetectorEvalJson(cfg, r.metrics, &r)));
        DTRAIN_RETURN_IF_ERROR(Guard("picture", [&] {
          return WriteDetectionPicture(*model, eval_snaps, 8, 0.3f, cfg.run_dir() + "/eval_snaps.png");
        }));
      }
    }
  }
  report("done");
  if (result) *result = r;
  return Status::OK();
}

}  // namespace dtrain::worker
