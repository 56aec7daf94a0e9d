// bench/quality: trains the embedders with their recommended configs and
// reports retrieval quality on the Fashion-MNIST test set (leave-one-out:
// Precision@1, R-Precision, MAP@R, Recall@K) beside the raw-pixel baseline,
// with the wall time of each run.
//
// Goals (issue "Embedders that train well"): ArcFace Precision@1 >= 0.92,
// triplet Precision@1 >= 0.91.
//
//   build/bin/bench_quality [CONFIG...] [--set k=v]... [--out FILE]
//   build/bin/bench_quality --combine A.json B.json ... [--out FILE]
// Default configs: configs/quality_arcface.textproto configs/quality_triplet.textproto.
// Each run's directory is runs/<job name>; the table goes to stdout and the
// figures to bench/results/quality.json. bench/quality.sh trains the configs
// in parallel processes (one thread each) and combines their JSON.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "dtrain/common/config.h"
#include "dtrain/common/logging.h"
#include "dtrain/worker/trainer.h"

namespace {

nlohmann::ordered_json Json(const dtrain::RetrievalMetrics& m) {
  nlohmann::ordered_json j = {{"precision_at_1", m.precision_at_1}, {"r_precision", m.r_precision},
                              {"map_at_r", m.map_at_r}};
  for (const auto& [k, v] : m.recall_at) j["recall_at_" + std::to_string(k)] = v;
  return j;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench/quality: retrieval quality of the trained embedders vs raw pixels"};
  std::vector<std::string> configs = {"configs/quality_arcface.textproto", "configs/quality_triplet.textproto"};
  std::vector<std::string> overrides;
  std::string out = "bench/results/quality.json";
  app.add_option("CONFIG", configs, "job configs to train and evaluate")->capture_default_str();
  app.add_option("--set", overrides, "override applied to every config");
  std::vector<std::string> combine;
  app.add_option("--out", out, "JSON output")->capture_default_str();
  app.add_option("--combine", combine, "only combine these result files (from earlier runs) into --out");
  CLI11_PARSE(app, argc, argv);
  (void)dtrain::InitLogging({});

  nlohmann::ordered_json results = nlohmann::ordered_json::array();
  nlohmann::ordered_json raw;
  if (!combine.empty()) {
    for (const std::string& f : combine) {
      std::ifstream in(f);
      if (!in) {
        std::fprintf(stderr, "cannot read %s\n", f.c_str());
        return 1;
      }
      const auto j = nlohmann::ordered_json::parse(in);
      for (const auto& r : j.at("runs")) results.push_back(r);
      raw = j.at("raw_pixels");
    }
  } else {
    for (const std::string& path : configs) {
      dtrain::JobConfig config;
      dtrain::Status st = dtrain::LoadJobConfig(path, overrides, &config);
      std::unique_ptr<dtrain::worker::Trainer> trainer;
      if (st.ok()) {
        st = dtrain::worker::Trainer::Create(config, std::make_unique<dtrain::worker::LocalStrategy>(), {}, &trainer);
      }
      dtrain::worker::TrainResult r;
      const auto t0 = std::chrono::steady_clock::now();
      if (st.ok()) st = trainer->Run(&r);
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (!st.ok()) {
        std::fprintf(stderr, "%s: %s\n", path.c_str(), st.ToString().c_str());
        return 1;
      }
      raw = Json(r.raw_pixel_metrics);
      results.push_back({{"config", path},
                         {"job", config.name()},
                         {"loss", config.loss().name()},
                         {"epochs", config.training().epochs()},
                         {"threads", config.training().threads()},
                         {"steps", r.steps},
                         {"train_seconds", r.train_seconds},
                         {"wall_seconds", secs},
                         {"images_per_sec", r.images_per_sec},
                         {"metrics", Json(r.model_metrics)}});
    }
  }
  std::printf("\n%-22s %8s %8s %8s %8s %8s %9s\n", "model", "P@1", "R-Prec", "MAP@R", "R@5", "R@10", "time (s)");
  auto print = [](const std::string& n, const nlohmann::ordered_json& m, double secs) {
    std::printf("%-22s %8.4f %8.4f %8.4f %8.4f %8.4f %9.0f\n", n.c_str(), m.at("precision_at_1").get<double>(),
                m.at("r_precision").get<double>(), m.at("map_at_r").get<double>(),
                m.value("recall_at_5", 0.0), m.value("recall_at_10", 0.0), secs);
  };
  for (const auto& r : results) print(r.at("job").get<std::string>(), r.at("metrics"), r.at("wall_seconds").get<double>());
  print("raw pixels (baseline)", raw, 0);
  nlohmann::ordered_json j = {{"benchmark", "quality"},
                              {"dataset", "fashion_mnist:test, leave-one-out"},
                              {"goals", {{"arcface_precision_at_1", 0.92}, {"triplet_precision_at_1", 0.91}}},
                              {"runs", results},
                              {"raw_pixels", raw}};
  std::ofstream(out) << j.dump(2) << "\n";
  std::printf("wrote %s\n", out.c_str());
  return 0;
}
