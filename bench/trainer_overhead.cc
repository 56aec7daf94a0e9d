// bench/trainer_overhead: images/s of dtrain's full training loop against a
// bare LibTorch forward/backward/step loop, same model, loss, optimizer and
// batch, measured alternately in one run (the machine is shared and noisy, so
// the ratio of figures taken side by side is what counts).
//
// Goal (issue "Embedders that train well"): overhead <= 5%, i.e.
// trainer / bare >= 0.95. A third loop, the trainer saving an asynchronous
// checkpoint every N steps, measures the cost of checkpointing (issue
// "Checkpoint store": step time grows by <= 5%).
//
//   build/bin/bench_trainer_overhead [--steps N] [--rounds R] [--batch B] [--threads T]
// Prints a table and writes bench/results/trainer_overhead.json.
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "dtrain/common/config.h"
#include "dtrain/common/logging.h"
#include "dtrain/data/fashion_mnist.h"
#include "dtrain/data/transforms.h"
#include "dtrain/models/registry.h"
#include "dtrain/worker/trainer.h"

namespace {

using Clock = std::chrono::steady_clock;

dtrain::JobConfig Config(int batch, int steps, int threads) {
  dtrain::JobConfig c;
  std::vector<std::string> o = {"data.batch_size=" + std::to_string(batch), "training.max_steps=" + std::to_string(steps),
                                "training.threads=" + std::to_string(threads), "training.progress_bar=false",
                                "training.log_every_steps=20", "eval.at_end=false"};
  dtrain::Status st = dtrain::ParseJobConfig("name: \"trainer_overhead\"\n", "bench", o, &c);
  if (!st.ok()) {
    std::fprintf(stderr, "%s\n", st.ToString().c_str());
    std::exit(1);
  }
  return c;
}

// The bare loop: batches prepared the same way (augmentation included), then
// forward, loss, backward, step; nothing else.
double BareImagesPerSec(const dtrain::JobConfig& c, const dtrain::data::Dataset& train, int steps) {
  torch::manual_seed(c.seed());
  dtrain::models::Embedder model{nullptr};
  std::shared_ptr<dtrain::models::LossModuleImpl> loss;
  if (!dtrain::models::BuildEmbedder(c.model(), &model).ok() ||
      !dtrain::models::BuildLoss(c.loss(), c.model().embedding_dim(), 10, &loss).ok()) {
    std::exit(1);
  }
  std::vector<torch::Tensor> params = model->parameters();
  for (auto& p : loss->parameters()) params.push_back(p);
  torch::optim::SGD opt(params, torch::optim::SGDOptions(c.optimizer().lr())
                                    .momentum(c.optimizer().momentum())
                                    .nesterov(true)
                                    .weight_decay(c.optimizer().weight_decay()));
  const int b = c.data().batch_size();
  dtrain::data::AugmentOptions aug;
  dtrain::data::NormalizeOptions norm;
  std::vector<int64_t> idx(b), labels;
  std::vector<float> pixels;
  const auto t0 = Clock::now();
  for (int s = 0; s < steps; ++s) {
    for (int i = 0; i < b; ++i) idx[i] = (static_cast<int64_t>(s) * b + i) % train.size;
    dtrain::data::MakeBatch(train, idx, 1, 0, &aug, norm, &pixels, &labels);
    torch::Tensor x = torch::from_blob(pixels.data(), {b, 1, 28, 28}).clone();
    torch::Tensor y = torch::from_blob(labels.data(), {b}, torch::kInt64).clone();
    opt.zero_grad();
    torch::Tensor l = loss->Compute(model->forward(x), y).loss;
    l.backward();
    opt.step();
    (void)l.item<float>();
  }
  return static_cast<double>(steps) * b / std::chrono::duration<double>(Clock::now() - t0).count();
}

double TrainerImagesPerSec(const dtrain::JobConfig& c, bool checkpoints = false) {
  std::unique_ptr<dtrain::worker::Trainer> trainer;
  dtrain::worker::TrainerOptions o;
  o.write_outputs = checkpoints;
  o.progress = false;
  o.evaluate = false;
  dtrain::Status st = dtrain::worker::Trainer::Create(c, std::make_unique<dtrain::worker::LocalStrategy>(), o, &trainer);
  dtrain::worker::TrainResult r;
  if (st.ok()) st = trainer->Run(&r);
  if (!st.ok()) {
    std::fprintf(stderr, "%s\n", st.ToString().c_str());
    std::exit(1);
  }
  return r.images_per_sec;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench/trainer_overhead: dtrain's training loop vs a bare LibTorch loop"};
  int steps = 60, rounds = 3, batch = 256, threads = 2, ckpt_every = 10;
  std::string out = "bench/results/trainer_overhead.json";
  app.add_option("--steps", steps, "training steps per measurement")->capture_default_str();
  app.add_option("--rounds", rounds, "alternating measurements of each loop")->capture_default_str();
  app.add_option("--batch", batch, "batch size")->capture_default_str();
  app.add_option("--threads", threads, "intra-op threads")->capture_default_str();
  app.add_option("--checkpoint-every", ckpt_every, "steps between async checkpoints in the third loop")
      ->capture_default_str();
  app.add_option("--out", out, "JSON output")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  dtrain::LoggingOptions lo;
  lo.level = "warn";
  (void)dtrain::InitLogging(lo);

  torch::set_num_threads(threads);
  const dtrain::JobConfig c = Config(batch, steps, threads);
  dtrain::data::Dataset train;
  dtrain::data::FashionMnistOptions fo;
  if (dtrain::Status st = dtrain::data::LoadFashionMnist(fo, &train); !st.ok()) {
    std::fprintf(stderr, "%s\n", st.ToString().c_str());
    return 1;
  }
  BareImagesPerSec(c, train, 5);  // warm-up: allocator, thread pool
  // The trainer again, saving an asynchronous checkpoint every `ckpt_every` steps.
  dtrain::JobConfig ck = c;
  const std::string ck_dir = "/tmp/dtrain_bench_trainer_overhead";
  ck.set_run_dir(ck_dir);
  ck.mutable_checkpoint()->set_dir(ck_dir + "/store");
  ck.mutable_checkpoint()->set_every_steps(ckpt_every);
  ck.mutable_checkpoint()->set_every_epochs(0);
  ck.mutable_checkpoint()->set_keep_last(2);
  ck.mutable_checkpoint()->set_async_save(true);
  std::vector<double> bare, full, saving;
  for (int r = 0; r < rounds; ++r) {
    bare.push_back(BareImagesPerSec(c, train, steps));
    full.push_back(TrainerImagesPerSec(c));
    std::filesystem::remove_all(ck_dir);
    saving.push_back(TrainerImagesPerSec(ck, /*checkpoints=*/true));
    std::printf("round %d: bare %.0f img/s, trainer %.0f img/s, trainer + checkpoints %.0f img/s\n", r + 1,
                bare.back(), full.back(), saving.back());
  }
  std::filesystem::remove_all(ck_dir);
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double mb = median(bare), mf = median(full), ms = median(saving);
  std::printf("\n%-34s %12s\n", "loop (resnet_embedder + arcface)", "images/s");
  std::printf("%-34s %12.0f\n", "bare LibTorch", mb);
  std::printf("%-34s %12.0f\n", "dtrain trainer", mf);
  std::printf("%-34s %12.3f   (goal >= 0.95)\n", "ratio trainer / bare", mf / mb);
  std::printf("%-34s %12.0f\n", ("trainer + async ckpt every " + std::to_string(ckpt_every)).c_str(), ms);
  std::printf("%-34s %12.3f   (goal >= 0.95)\n", "ratio with checkpoints / without", ms / mf);
  std::printf("batch %d, %d steps x %d rounds, %d thread(s), medians\n", batch, steps, rounds, threads);
  nlohmann::ordered_json j = {{"benchmark", "trainer_overhead"}, {"batch", batch},  {"steps", steps},
                              {"rounds", rounds},                {"threads", threads}, {"bare_images_per_sec", bare},
                              {"trainer_images_per_sec", full},  {"median_bare", mb},  {"median_trainer", mf},
                              {"ratio", mf / mb},                {"goal_ratio", 0.95},
                              {"checkpoint_every_steps", ckpt_every}, {"trainer_with_checkpoints_images_per_sec", saving},
                              {"median_with_checkpoints", ms}, {"checkpoint_ratio", ms / mf}};
  std::ofstream(out) << j.dump(2) << "\n";
  std::printf("wrote %s\n", out.c_str());
  return 0;
}
