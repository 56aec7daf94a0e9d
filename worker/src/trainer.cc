#include "dtrain/worker/trainer.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <limits>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <mutex>
#include <optional>
#include <nlohmann/json.hpp>
#include <thread>
#include <unordered_map>

#include <google/protobuf/text_format.h>

#include "dtrain/common/checkpoint_store.h"
#include "dtrain/common/config.h"
#include "dtrain/common/metrics_log.h"
#include "dtrain/common/progress.h"
#include "dtrain/data/fashion_mnist.h"
#include "dtrain/data/sampler.h"
#include "dtrain/data/transforms.h"
#include "dtrain/models/registry.h"
#include "dtrain/worker/checkpointing.h"
#include "dtrain/worker/evaluation.h"
#include "dtrain/common/lr_schedule.h"
#include "torch_guard.h"

namespace dtrain::worker {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

using internal::Guard;

// One prepared batch and the sampler state after it.
struct Batch {
  torch::Tensor images;  // [B, 1, rows, cols] float
  torch::Tensor labels;  // [B] int64
  data::SamplerState state_after;
  bool end_of_epoch = false;
};

// Prepares batches ahead of the training step on one background thread.
// Protocol: StartEpoch(e) before each epoch; Next() until it returns a batch
// with end_of_epoch. The sampler is touched only by the loader thread while an
// epoch runs.
class BatchLoader {
 public:
  BatchLoader(const data::Dataset& dataset, data::Sampler* sampler, uint64_t seed,
              std::optional<data::AugmentOptions> augment, data::NormalizeOptions normalize, int prefetch)
      : dataset_(dataset),
        sampler_(sampler),
        seed_(seed),
        augment_(augment),
        normalize_(normalize),
        capacity_(std::max(prefetch, 1)) {}

  ~BatchLoader() { Stop(); }

  void StartEpoch(uint64_t epoch, bool reset_position) {
    Stop();
    if (reset_position) sampler_->StartEpoch(epoch);
    epoch_ = epoch;
    stop_ = false;
    thread_ = std::thread([this] { Loop(); });
  }

  Batch Next() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return !queue_.empty(); });
    Batch b = std::move(queue_.front());
    queue_.pop_front();
    cv_.notify_all();
    return b;
  }

 private:
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      queue_.clear();
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    queue_.clear();
  }

  void Loop() {
    std::vector<int64_t> indices, labels;
    std::vector<float> pixels;
    while (true) {
      Batch b;
      if (!sampler_->Next(&indices)) {
        b.end_of_epoch = true;
      } else {
        data::MakeBatch(dataset_, indices, seed_, epoch_, augment_ ? &*augment_ : nullptr, normalize_, &pixels,
                        &labels);
        const int64_t n = static_cast<int64_t>(indices.size());
        // Plain memcpy, not Tensor::clone(): a torch op that parallelises
        // (copies of this size do) would start a second OpenMP team from this
        // thread and oversubscribe the cores the training step is using.
        b.images = torch::empty({n, 1, dataset_.rows, dataset_.cols}, torch::kFloat32);
        std::memcpy(b.images.data_ptr<float>(), pixels.data(), pixels.size() * sizeof(float));
        b.labels = torch::empty({n}, torch::kInt64);
        std::memcpy(b.labels.data_ptr<int64_t>(), labels.data(), labels.size() * sizeof(int64_t));
      }
      b.state_after = sampler_->state();
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || static_cast<int>(queue_.size()) < capacity_; });
      if (stop_) return;
      const bool end = b.end_of_epoch;
      queue_.push_back(std::move(b));
      cv_.notify_all();
      if (end) return;
    }
  }

  const data::Dataset& dataset_;
  data::Sampler* sampler_;
  const uint64_t seed_;
  const std::optional<data::AugmentOptions> augment_;
  const data::NormalizeOptions normalize_;
  const int capacity_;
  uint64_t epoch_ = 0;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Batch> queue_;  // GUARDED_BY(mu_)
  bool stop_ = false;        // GUARDED_BY(mu_)
  std::thread thread_;
};

}  // namespace

std::unique_ptr<torch::optim::Optimizer> MakeOptimizer(const OptimizerConfig& o,
                                                       const std::vector<torch::Tensor>& params) {
  if (o.kind() == OptimizerConfig::ADAMW) {
    return std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(o.lr())
                                                             .betas({o.beta1(), o.beta2()})
                                                             .eps(o.eps())
                                                             .weight_decay(o.weight_decay()));
  }
  return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(o.lr())
                                                         .momentum(o.momentum())
                                                         .nesterov(o.nesterov())
                                                         .weight_decay(o.weight_decay()));
}

namespace {

nlohmann::ordered_json MetricsJson(const RetrievalMetrics& m) {
  nlohmann::ordered_json j;
  j["precision_at_1"] = m.precision_at_1;
  j["r_precision"] = m.r_precision;
  j["map_at_r"] = m.map_at_r;
  for (const auto& [k, v] : m.recall_at) j["recall_at_" + std::to_string(k)] = v;
  j["queries"] = m.queries;
  return j;
}

}  // namespace

struct Trainer::Impl {
  JobConfig config;
  TrainerOptions options;
  std::unique_ptr<Strategy> strategy;
  data::Dataset train;
  std::unique_ptr<data::Sampler> sampler;
  models::Embedder model{nullptr};
  std::shared_ptr<models::LossModuleImpl> loss;
  std::vector<torch::Tensor> parameters;
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  LrScheduleOptions schedule;
  int64_t total_steps = 0;
  std::unique_ptr<MetricsLog> metrics;
  std::unique_ptr<CheckpointStore> store;          // chief only, when checkpointing
  std::unique_ptr<AsyncCheckpointWriter> writer;   // when checkpoint.async_save
  TrainerState resume_state;                       // valid when resumed
  bool resumed = false;
  int64_t checkpoints_saved = 0;

  TrainingObjects Objects() {
    return TrainingObjects{model.get(), loss.get(), optimizer.get(), config.optimizer().kind()};
  }
  // Snapshots the state after `state.step()` steps and saves it (queued when async).
  Status SaveCheckpoint(const TrainerState& state);
};

Status Trainer::Impl::SaveCheckpoint(const TrainerState& state) {
  if (!store) return Status::OK();
  TrainerState s = state;
  const torch::Tensor rng = at::detail::getDefaultCPUGenerator().get_state();
  s.set_torch_rng_state(std::string(static_cast<const char*>(rng.data_ptr()), rng.numel()));
  CheckpointData data;
  DTRAIN_RETURN_IF_ERROR(Guard("checkpoint snapshot", [&] {
    return CaptureCheckpoint(config, strategy->name(), strategy->data_world_size(), Objects(), s, &data);
  }));
  ++checkpoints_saved;
  if (writer) {
    writer->Submit(std::move(data));
    return writer->last_error();
  }
  return store->Save(data);
}

Trainer::Trainer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Trainer::~Trainer() = default;
models::Embedder Trainer::model() const { return impl_->model; }
std::shared_ptr<models::LossModuleImpl> Trainer::loss() const { return impl_->loss; }
const JobConfig& Trainer::config() const { return impl_->config; }

Status Trainer::Create(const JobConfig& config, std::unique_ptr<Strategy> strategy, TrainerOptions options,
                       std::unique_ptr<Trainer>* out) {
  auto impl = std::make_unique<Impl>();
  impl->config = config;
  impl->options = options;
  impl->strategy = std::move(strategy);
  const Strategy& s = *impl->strategy;

  if (config.training().threads() > 0) torch::set_num_threads(config.training().threads());
  torch::manual_seed(config.seed());

  data::FashionMnistOptions fo;
  fo.dir = config.data().dir();
  fo.split = data::Split::kTrain;
  fo.limit = config.data().train_limit();
  fo.classes.assign(config.data().classes().begin(), config.data().classes().end());
  DTRAIN_RETURN_IF_ERROR(data::LoadFashionMnist(fo, &impl->train));

  if (config.data().sampler() == DataConfig::PK) {
    data::PKSampler::Options po;
    po.labels = Labels(impl->train);
    po.num_classes = impl->train.num_classes;
    po.p = config.data().pk_classes();
    po.k = config.data().pk_images();
    po.world_size = s.data_world_size();
    po.rank = s.data_rank();
    po.seed = config.seed();
    std::unique_ptr<data::PKSampler> pk;
    DTRAIN_RETURN_IF_ERROR(data::PKSampler::Create(std::move(po), &pk).WithContext("data.sampler PK"));
    impl->sampler = std::move(pk);
  } else {
    data::ShardedSampler::Options so;
    so.dataset_size = impl->train.size;
    so.world_size = s.data_world_size();
    so.rank = s.data_rank();
    so.local_batch = config.data().batch_size();
    so.seed = config.seed();
    std::unique_ptr<data::ShardedSampler> sharded;
    DTRAIN_RETURN_IF_ERROR(data::ShardedSampler::Create(so, &sharded).WithContext("data.sampler SHUFFLE"));
    impl->sampler = std::move(sharded);
  }

  DTRAIN_RETURN_IF_ERROR(models::BuildEmbedder(config.model(), &impl->model));
  DTRAIN_RETURN_IF_ERROR(
      models::BuildLoss(config.loss(), config.model().embedding_dim(), impl->train.num_classes, &impl->loss));
  for (const auto& p : impl->model->parameters()) impl->parameters.push_back(p);
  for (const auto& p : impl->loss->parameters()) impl->parameters.push_back(p);
  impl->optimizer = MakeOptimizer(config.optimizer(), impl->parameters);

  const int64_t per_epoch = impl->sampler->batches_per_epoch();
  impl->total_steps = config.training().max_steps() > 0 ? config.training().max_steps()
                                                        : per_epoch * config.training().epochs();
  impl->schedule.schedule = config.schedule();
  impl->schedule.base_lr = config.optimizer().lr();
  impl->schedule.total_steps = impl->total_steps;
  impl->schedule.steps_per_epoch = per_epoch;

  // Resume and checkpoint store. Every rank reads the checkpoint (read-only;
  // the store is on a shared filesystem); Setup() below is collective, so no
  // rank goes past it before every rank has read and closed the store; only
  // then does the chief open it for writing.
  const CheckpointConfig& ck = config.checkpoint();
  const bool checkpointing = ck.every_steps() > 0 || ck.every_epochs() > 0;
  StoreOptions so;
  so.path = ck.dir();
  so.keep_last = ck.keep_last();
  so.job_name = config.name();
  so.config_digest = ResumeDigest(config);
  so.force = options.force_store;
  if (options.resume) {
    DTRAIN_RETURN_IF_ERROR(ResumeFromStore(so, impl->Objects(), impl->sampler.get(), s.data_world_size(), per_epoch,
                                           &impl->resume_state, &impl->resumed));
    if (impl->resumed && !impl->resume_state.torch_rng_state().empty()) {
      const std::string& rs = impl->resume_state.torch_rng_state();
      torch::Tensor t = torch::empty({static_cast<int64_t>(rs.size())}, torch::kUInt8);
      std::memcpy(t.data_ptr(), rs.data(), rs.size());
      at::Generator gen = at::detail::getDefaultCPUGenerator();
      gen.set_state(t);
    }
  }

  std::vector<torch::Tensor> buffers;
  for (const auto& b : impl->model->buffers()) buffers.push_back(b);
  TrainingContext context;
  for (const auto& p : impl->model->named_parameters()) context.parameter_names.push_back("model/" + p.key());
  for (const auto& p : impl->loss->named_parameters()) context.parameter_names.push_back("loss/" + p.key());
  context.optimizer = impl->optimizer.get();
  context.optimizer_kind = config.optimizer().kind();
  context.schedule = impl->schedule;
  context.resumed = impl->resumed;
  context.start_step = impl->resumed ? impl->resume_state.step() : 0;
  context.model = impl->model.get();
  context.loss = impl->loss.get();
  impl->strategy->Attach(context);
  DTRAIN_RETURN_IF_ERROR(impl->strategy->Setup(impl->parameters, buffers));

  if (checkpointing && options.write_outputs && s.is_chief()) {
    so.read_only = false;
    so.create_if_missing = true;
    DTRAIN_RETURN_IF_ERROR(CheckpointStore::Open(so, &impl->store).WithContext("checkpoint store " + ck.dir()));
    if (ck.async_save()) impl->writer = std::make_unique<AsyncCheckpointWriter>(impl->store.get());
  }

  if (options.write_outputs && s.is_chief()) {
    DTRAIN_RETURN_IF_ERROR(WriteResolvedConfig(config, config.run_dir() + "/config.textproto"));
    DTRAIN_RETURN_IF_ERROR(MetricsLog::Open(config.run_dir() + "/metrics.jsonl", &impl->metrics));
  }
  out->reset(new Trainer(std::move(impl)));
  return Status::OK();
}

Status Trainer::Run(TrainResult* result) {
  Impl& m = *impl_;
  const JobConfig& cfg = m.config;
  Strategy& strategy = *m.strategy;
  const int64_t per_epoch = m.sampler->batches_per_epoch();
  const int64_t epochs = (m.total_steps + per_epoch - 1) / per_epoch;
  const int log_every = cfg.training().log_every_steps();
  const bool show_progress = m.options.progress && cfg.training().progress_bar() && strategy.is_chief();

  std::optional<data::AugmentOptions> augment;
  if (cfg.data().augment().enabled()) {
    data::AugmentOptions a;
    a.pad = cfg.data().augment().pad();
    a.hflip = cfg.data().augment().hflip();
    augment = a;
  }
  BatchLoader loader(m.train, m.sampler.get(), cfg.seed(), augment, data::NormalizeOptions{},
                     cfg.data().prefetch());

  spdlog::info("training {}: {} {} + {}, {} step(s) = {} epoch(s) x {} step(s){}, batch {} x {} worker(s), {} thread(s)",
               cfg.name(), strategy.name(), cfg.model().name(), cfg.loss().name(), m.total_steps, epochs, per_epoch,
               strategy.SharesSteps() ? " shared among the workers" : "", cfg.data().batch_size(),
               strategy.data_world_size(), torch::get_num_threads());

  m.model->train();
  m.loss->train();
  int64_t step = m.resumed ? m.resume_state.step() : 0;
  const int64_t first_step = step;
  const int64_t first_epoch = m.resumed ? static_cast<int64_t>(m.resume_state.sampler_epoch()) : 0;
  const CheckpointConfig& ck = cfg.checkpoint();
  // Shared steps (async share_work): the job is done when the ranks together
  // have made total_steps steps; `step` counts this rank's own.
  const bool shared = strategy.SharesSteps();
  auto job_step = [&]() { return shared ? std::min(strategy.JobStep(), m.total_steps) : step; };
  auto done = [&]() { return job_step() >= m.total_steps; };
  int64_t last_checkpoint_mark = ck.every_steps() > 0 ? step / ck.every_steps() : 0;
  // stop_after_steps interrupts after this rank's own steps; shared steps
  // have no per-rank limit otherwise.
  const int64_t stop_at = m.options.stop_after_steps > 0
                              ? (shared ? m.options.stop_after_steps : std::min(m.options.stop_after_steps, m.total_steps))
                              : (shared ? std::numeric_limits<int64_t>::max() : m.total_steps);
  auto state_at = [&](uint64_t sampler_epoch, uint64_t position) {
    TrainerState s;
    s.set_step(job_step());
    s.set_sampler_epoch(sampler_epoch);
    s.set_sampler_position(position);
    s.set_steps_per_epoch(per_epoch);
    return s;
  };
  double interval_loss = 0, interval_data = 0, interval_compute = 0, interval_step = 0;
  int64_t interval_steps = 0, interval_images = 0, total_images = 0;
  double last_loss = 0;
  TrainProgress progress;
  progress.step = step;
  progress.total_steps = m.total_steps;
  auto report = [&](const char* phase) {
    if (!m.options.on_progress) return;
    progress.step = job_step();
    progress.phase = phase;
    m.options.on_progress(progress);
  };
  report("training");
  // Every rank prepares (a pipeline gathers its stages to the chief); the
  // chief snapshots and saves.
  auto checkpoint = [&](const TrainerState& st) -> Status {
    report("checkpointing");
    DTRAIN_RETURN_IF_ERROR(strategy.PrepareCheckpoint().WithContext("checkpoint at step " + std::to_string(st.step())));
    if (strategy.is_chief()) DTRAIN_RETURN_IF_ERROR(m.SaveCheckpoint(st));
    report("training");
    return Status::OK();
  };
  const auto run_start = Clock::now();
  auto interval_start = run_start;

  const bool slow = cfg.training().slow_rank() >= 0 && cfg.training().slow_factor() > 1.0f;
  bool interrupted = false;
  bool finished = false;  // strategy.Finish() called
  for (int64_t epoch = first_epoch; (shared || epoch < epochs) && !done() && !interrupted; ++epoch) {
    // A resumed epoch continues from the restored sampler position.
    loader.StartEpoch(static_cast<uint64_t>(epoch), /*reset_position=*/!(m.resumed && epoch == first_epoch));
    std::unique_ptr<ProgressBar> bar;
    if (show_progress) {
      ProgressOptions po;
      po.label = "epoch " + std::to_string(epoch + 1) + (shared ? std::string() : "/" + std::to_string(epochs));
      po.total = shared ? per_epoch : std::min(per_epoch, m.total_steps - step);
      bar = std::make_unique<ProgressBar>(po);
    }
    int64_t epoch_step = (m.resumed && epoch == first_epoch)
                             ? static_cast<int64_t>(m.resume_state.sampler_position()) / m.sampler->global_batch()
                             : 0;
    while (!done()) {
      if (step >= stop_at) {
        interrupted = true;
        break;
      }
      const auto t0 = Clock::now();
      Batch batch = loader.Next();
      if (batch.end_of_epoch) break;
      const auto t1 = Clock::now();

      const double lr = LearningRate(m.schedule, step);
      for (auto& group : m.optimizer->param_groups()) group.options().set_lr(lr);

      models::LossOutput lo;
      Status st = Guard("training step", [&]() -> Status {
        DTRAIN_RETURN_IF_ERROR(strategy.BeginStep());
        // Repeated when the strategy asks for it (async: gradients refused
        // as too stale, fresh parameters pulled), on the same batch.
        bool recompute = true;
        while (recompute) {
          m.optimizer->zero_grad();
          if (strategy.RunsForwardBackward()) {
            DTRAIN_RETURN_IF_ERROR(strategy.ForwardBackward(batch.images, batch.labels, &lo));
          } else {
            torch::Tensor emb = m.model->forward(batch.images);
            DTRAIN_RETURN_IF_ERROR(strategy.ComputeLoss(*m.loss, emb, batch.labels, &lo));
            lo.loss.backward();
          }
          DTRAIN_RETURN_IF_ERROR(strategy.FinishGradients());
          if (cfg.optimizer().grad_clip_norm() > 0) {
            torch::nn::utils::clip_grad_norm_(m.parameters, cfg.optimizer().grad_clip_norm());
          }
          DTRAIN_RETURN_IF_ERROR(strategy.ApplyUpdate(*m.optimizer, &recompute));
        }
        return Status::OK();
      });
      if (!st.ok()) return st.WithContext("step " + std::to_string(step));
      if (slow && strategy.rank() == cfg.training().slow_rank()) {
        // Fault injection (training.slow_rank): this worker's steps take
        // slow_factor times as long.
        std::this_thread::sleep_for(std::chrono::duration<double>(
            (static_cast<double>(cfg.training().slow_factor()) - 1.0) * Seconds(t1, Clock::now())));
      }
      const auto t2 = Clock::now();

      const double loss_value = lo.loss.item<double>();
      if (!std::isfinite(loss_value)) {
        return Status::Aborted("the loss became " + std::to_string(loss_value) + " at step " + std::to_string(step) +
                               " (epoch " + std::to_string(epoch) + ", lr " + std::to_string(lr) +
                               "); lower optimizer.lr or set optimizer.grad_clip_norm");
      }
      const int64_t images = batch.labels.size(0);
      ++step;
      ++epoch_step;
      ++interval_steps;
      interval_images += images;
      total_images += images;
      interval_loss += loss_value;
      interval_data += Seconds(t0, t1);
      interval_compute += Seconds(t1, t2);
      interval_step += Seconds(t0, t2);

      const bool log_now = interval_steps >= log_every || done();
      if (log_now) {
        const double secs = Seconds(interval_start, Clock::now());
        const double mean_loss = strategy.AverageAcrossWorkers(interval_loss / static_cast<double>(interval_steps));
        const double ips = static_cast<double>(interval_images) * strategy.data_world_size() / std::max(secs, 1e-9);
        last_loss = mean_loss;
        progress.loss = mean_loss;
        progress.images_per_sec = static_cast<double>(interval_images) / std::max(secs, 1e-9);
        if (m.metrics) {
          const double n = static_cast<double>(interval_steps);
          MetricsLog::Record rec = {{"step", static_cast<double>(step)},
                                    {"epoch", static_cast<double>(epoch) + static_cast<double>(epoch_step) /
                                                                               static_cast<double>(per_epoch)},
                                    {"loss", mean_loss},
                                    {"lr", lr},
                                    {"images_per_sec", ips},
                                    {"data_ms", 1e3 * interval_data / n},
                                    {"compute_ms", 1e3 * interval_compute / n},
                                    {"step_ms", 1e3 * interval_step / n},
                                    {"active_fraction", lo.active_fraction}};
          strategy.AddStepMetrics(&rec);
          DTRAIN_RETURN_IF_ERROR(m.metrics->Append(rec));
        }
        if (bar) {
          char buf[32];
          std::snprintf(buf, sizeof buf, "%.4f", mean_loss);
          std::string loss_s = buf;
          std::snprintf(buf, sizeof buf, "%.0f", ips);
          std::string ips_s = buf;
          std::snprintf(buf, sizeof buf, "%.4g", lr);
          bar->Update(epoch_step, {{"loss", loss_s}, {"img/s", ips_s}, {"lr", buf}});
        }
        interval_loss = interval_data = interval_compute = interval_step = 0;
        interval_steps = interval_images = 0;
        interval_start = Clock::now();
      }
      progress.epoch = static_cast<double>(epoch) + static_cast<double>(epoch_step) / static_cast<double>(per_epoch);
      report("training");
      // Every every_steps steps: this rank's, or the job's when shared (the
      // job's step may pass a multiple while another rank steps).
      const bool checkpoint_due =
          ck.every_steps() > 0 && !done() &&
          (shared ? job_step() / ck.every_steps() > last_checkpoint_mark : step % ck.every_steps() == 0);
      if (checkpoint_due) {
        if (shared) last_checkpoint_mark = job_step() / ck.every_steps();
        DTRAIN_RETURN_IF_ERROR(checkpoint(state_at(batch.state_after.epoch, batch.state_after.position)));
      }
    }
    if (bar) bar->Finish();
    const bool epoch_done =
        !interrupted && (shared ? epoch_step >= per_epoch || done() : step % per_epoch == 0 || step == m.total_steps);
    if (done() && !interrupted) {
      // Every worker is done before the final checkpoint and model (async:
      // the chief then holds every worker's last update).
      DTRAIN_RETURN_IF_ERROR(strategy.Finish());
      finished = true;
    }
    if (epoch_done && (done() || (ck.every_epochs() > 0 && (epoch + 1) % ck.every_epochs() == 0))) {
      DTRAIN_RETURN_IF_ERROR(checkpoint(state_at(static_cast<uint64_t>(epoch + 1), 0)));
    }
  }
  if (!finished) DTRAIN_RETURN_IF_ERROR(strategy.Finish());
  if (m.writer) {
    report("checkpointing");
    DTRAIN_RETURN_IF_ERROR(m.writer->Flush().WithContext("writing checkpoints"));
  }

  TrainResult r;
  r.steps = step;
  r.resumed_from_step = first_step;
  r.checkpoints_saved = m.checkpoints_saved;
  r.epochs_completed = step / per_epoch;
  r.train_seconds = Seconds(run_start, Clock::now());
  r.images_per_sec = static_cast<double>(total_images) * strategy.data_world_size() / std::max(r.train_seconds, 1e-9);
  r.final_loss = last_loss;
  spdlog::info("trained {} step(s) in {:.1f} s: {:.0f} images/s, final loss {:.4f}", r.steps, r.train_seconds,
               r.images_per_sec, r.final_loss);

  if (interrupted) {
    if (result) *result = r;
    return Status::OK();
  }
  if (strategy.is_chief()) {
    if (m.options.write_outputs) {
      DTRAIN_RETURN_IF_ERROR(SaveModel(*m.model, cfg.model(), cfg.run_dir() + "/model.pt"));
    }
    if (m.options.evaluate && cfg.eval().at_end()) {
      report("evaluating");
      DTRAIN_RETURN_IF_ERROR(EvaluateOnTestSplit(cfg, *m.model, &r.model_metrics, &r.raw_pixel_metrics));
      r.evaluated = true;
      if (m.options.write_outputs) {
        DTRAIN_RETURN_IF_ERROR(
            WriteFileAtomically(cfg.run_dir() + "/eval.json", EvalJson(cfg, r.model_metrics, r.raw_pixel_metrics, &r)));
      }
    }
  }
  report("done");
  if (result) *result = r;
  return Status::OK();
}

Status EvaluateOnTestSplit(const JobConfig& config, models::EmbedderImpl& model, RetrievalMetrics* model_metrics,
                           RetrievalMetrics* raw_pixel_metrics) {
  data::FashionMnistOptions fo;
  fo.dir = config.data().dir();
  fo.split = data::Split::kTest;
  fo.limit = config.data().test_limit();
  fo.classes.assign(config.data().classes().begin(), config.data().classes().end());
  data::Dataset test;
  DTRAIN_RETURN_IF_ERROR(data::LoadFashionMnist(fo, &test));
  const std::vector<int> ks(config.eval().recall_at().begin(), config.eval().recall_at().end());
  const std::vector<int64_t> labels = Labels(test);
  return Guard("evaluation", [&]() -> Status {
    const auto t0 = Clock::now();
    torch::Tensor emb = EmbedDataset(model, test, config.eval().batch_size());
    DTRAIN_RETURN_IF_ERROR(EvaluateEmbeddings(emb, labels, ks, model_metrics));
    if (raw_pixel_metrics != nullptr) {
      DTRAIN_RETURN_IF_ERROR(EvaluateEmbeddings(RawPixelEmbeddings(test), labels, ks, raw_pixel_metrics));
    }
    spdlog::info("evaluated {} test images in {:.1f} s: {}", test.size, Seconds(t0, Clock::now()),
                 FormatRetrievalMetrics(*model_metrics));
    return Status::OK();
  });
}

std::string EvalJson(const JobConfig& config, const RetrievalMetrics& model_metrics,
                     const RetrievalMetrics& raw_pixel_metrics, const TrainResult* training) {
  nlohmann::ordered_json j;
  j["job"] = config.name();
  j["dataset"] = "fashion_mnist:test";
  j["protocol"] = "test set queried against itself, query left out (Musgrave et al. 2020)";
  j["model"] = MetricsJson(model_metrics);
  j["raw_pixels"] = MetricsJson(raw_pixel_metrics);
  if (training != nullptr) {
    j["training"] = {{"steps", training->steps},
                     {"seconds", training->train_seconds},
                     {"images_per_sec", training->images_per_sec},
                     {"final_loss", training->final_loss}};
  }
  return j.dump(2) + "\n";
}

std::string EvalTable(const RetrievalMetrics& model, const RetrievalMetrics& raw) {
  std::string out;
  char buf[160];
  std::snprintf(buf, sizeof buf, "%-14s %10s %10s\n", "metric", "model", "raw pixels");
  out += buf;
  auto row = [&](const char* name, double a, double b) {
    std::snprintf(buf, sizeof buf, "%-14s %10.4f %10.4f\n", name, a, b);
    out += buf;
  };
  row("Precision@1", model.precision_at_1, raw.precision_at_1);
  row("R-Precision", model.r_precision, raw.r_precision);
  row("MAP@R", model.map_at_r, raw.map_at_r);
  for (size_t i = 0; i < model.recall_at.size() && i < raw.recall_at.size(); ++i) {
    const std::string name = "Recall@" + std::to_string(model.recall_at[i].first);
    row(name.c_str(), model.recall_at[i].second, raw.recall_at[i].second);
  }
  return out;
}

namespace {

// Every parameter and buffer of `model` under its full dotted name.
std::vector<std::pair<std::string, torch::Tensor>> NamedTensors(torch::nn::Module& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : model.named_parameters(/*recurse=*/true)) out.emplace_back(p.key(), p.value());
  for (const auto& b : model.named_buffers(/*recurse=*/true)) out.emplace_back(b.key(), b.value());
  return out;
}

std::string Shape(const torch::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

}  // namespace

Status SaveModel(torch::nn::Module& model, const ModelConfig& config, const std::string& path) {
  return Guard("saving the model", [&]() -> Status {
    std::error_code ec;
    std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
    torch::serialize::OutputArchive archive;
    for (const auto& [name, t] : NamedTensors(model)) archive.write(name, t);
    std::string text;
    if (!google::protobuf::TextFormat::PrintToString(config, &text)) return Status::Internal("cannot print the model config");
    archive.write(kModelConfigKey, c10::IValue(text));
    const std::string tmp = path + ".tmp";
    archive.save_to(tmp);
    std::filesystem::rename(tmp, path, ec);
    if (ec) return Status::IOError("cannot rename " + tmp + " to " + path + ": " + ec.message());
    return Status::OK();
  });
}

Status LoadModel(const std::string& path, torch::nn::Module& model) {
  if (!std::filesystem::exists(path)) return Status::NotFound("model file " + path + " does not exist");
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path);
  } catch (const c10::Error& e) {
    return Status::Corruption("cannot read the model file " + path + ": " + e.what_without_backtrace());
  }
  // Read everything first and check it against the model, so that a
  // mismatched file changes nothing.
  std::vector<std::pair<torch::Tensor, torch::Tensor>> assignments;
  for (const auto& [name, target] : NamedTensors(model)) {
    torch::Tensor t;
    bool found = false;
    try {
      found = archive.try_read(name, t);
    } catch (const c10::Error& e) {
      return Status::Corruption(path + ": tensor '" + name + "' cannot be read: " + e.what_without_backtrace());
    }
    if (!found) {
      return Status::Corruption(path + " has no tensor '" + name + "': it does not hold this config's model");
    }
    if (!t.sizes().equals(target.sizes()) || t.scalar_type() != target.scalar_type()) {
      return Status::Corruption(path + ": tensor '" + name + "' has shape " + Shape(t) + ", the config's model needs " +
                                Shape(target) + " (does model.* of the config match the one trained?)");
    }
    assignments.emplace_back(target, t);
  }
  torch::NoGradGuard no_grad;
  for (auto& [target, t] : assignments) target.copy_(t);
  return Status::OK();
}

}  // namespace dtrain::worker

namespace dtrain::worker {

Status ReadModelConfig(const std::string& path, ModelConfig* config) {
  if (!std::filesystem::exists(path)) return Status::NotFound("model file " + path + " does not exist");
  torch::serialize::InputArchive archive;
  c10::IValue value;
  bool found = false;
  try {
    archive.load_from(path);
    found = archive.try_read(kModelConfigKey, value);
  } catch (const c10::Error& e) {
    return Status::Corruption("cannot read the model file " + path + ": " + e.what_without_backtrace());
  }
  if (!found) return Status::NotFound("model file " + path + " carries no model config");
  if (!value.isString()) return Status::Corruption(path + ": its model config is not text");
  ModelConfig parsed;
  if (!google::protobuf::TextFormat::ParseFromString(value.toStringRef(), &parsed)) {
    return Status::Corruption(path + ": its model config does not parse");
  }
  *config = parsed;
  return Status::OK();
}

Status LoadModelFromCheckpoint(const std::string& store_dir, torch::nn::Module& model, int64_t* step,
                               std::vector<std::string>* warnings) {
  StoreOptions so;
  so.path = store_dir;
  so.read_only = true;
  so.create_if_missing = false;
  std::unique_ptr<CheckpointStore> store;
  DTRAIN_RETURN_IF_ERROR(CheckpointStore::Open(so, &store));
  CheckpointData data;
  DTRAIN_RETURN_IF_ERROR(store->LoadLatestGood(&data, warnings));
  std::unordered_map<std::string, const TensorRecord*> by_name;
  for (const TensorRecord& r : data.tensors) by_name[r.name] = &r;
  const std::string where = store_dir + " checkpoint " + std::to_string(data.step);
  std::vector<std::pair<torch::Tensor, torch::Tensor>> assignments;
  for (const auto& [name, target] : NamedTensors(model)) {
    auto it = by_name.find("model/" + name);
    if (it == by_name.end()) return Status::Corruption(where + " has no tensor 'model/" + name + "'");
    torch::Tensor t;
    DTRAIN_RETURN_IF_ERROR(RecordToTensor(*it->second, &t));
    if (!t.sizes().equals(target.sizes()) || t.scalar_type() != target.scalar_type()) {
      return Status::Corruption(where + ": tensor 'model/" + name + "' has shape " + Shape(t) + ", the model needs " +
                                Shape(target));
    }
    assignments.emplace_back(target, t);
  }
  torch::NoGradGuard no_grad;
  for (auto& [target, t] : assignments) target.copy_(t);
  *step = data.step;
  return Status::OK();
}

}  // namespace dtrain::worker
