// bench/snaps: the snap application end to end (issue "Fashion-item detector
// and snap retrieval"), on evaluation snaps generated from the test split.
//
//  1. The detector: AP50, AP75 and COCO AP@[.50:.95] per category and their
//     mean (worker::EvaluateDetector).
//  2. Three snap indexes of the same snaps (indexer/snap_index.h): detected
//     boxes, ground-truth boxes, and whole snaps (no detector); indexing
//     throughput (snaps/s: finding items, cropping, embedding, FAISS,
//     writing).
//  3. Retrieval, each index queried by the embedding alone (pixel and
//     instance weights 0; rows "detected", "truth", "whole") and re-ranked
//     with the item templates at the default weights (SnapIndexOptions::
//     pixel_weight, SnapQueryOptions::instance_weight; rows "+pixels"; other
//     weights: --pixel-weights, --instance-weights). Queries are the clean test-split images of the items placed
//     in the snaps (each source image once, in order of appearance); their
//     category is predicted by the detector (the same prediction for the
//     detected and ground-truth indexes, so the two differ only in their
//     boxes; the whole-snap index has no categories). Per query, over the
//     top 5 snaps:
//       instance Recall@1 / Recall@5  a snap holding that very source image
//                                     is the first / among the top 5;
//       Precision@5 (matched item)    the share of the 5 snaps whose matched
//                                     item has the query's fine class (the
//                                     fine class of a detected box is that of
//                                     the annotated item it overlaps with
//                                     IoU >= 0.5; none counts as a miss);
//       Precision@5 (snap holds)      the share of the 5 snaps holding an
//                                     item of the query's fine class (the
//                                     only precision a whole-snap index has);
//       category accuracy             the predicted category is the item's.
//  4. Query latency: p50 / p99 of single queries (category prediction,
//     embedding, search, ranking), one after another.
//
// Goals: AP50 >= 0.97 and COCO AP >= 0.80 (mean over categories); detected
// boxes: Recall@5 >= 0.90 and Precision@5 (matched item) >= 0.90.
//
//   build/bin/bench_snaps --detector runs/detector_snaps --embedder runs/quickstart
//       [--embedder-for footwear=RUN ...] [--snaps 1000] [--queries 2000]
//       [--timed 200] [--threads 0] [--out bench/results/snaps.json]
// The evaluation snaps are those of the detector run's config (data.snaps,
// eval_seed), --snaps of them; on 2 cores --snaps 300 --queries 600 takes
// about a minute.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "bench_util.h"
#include "dtrain/common/config.h"
#include "dtrain/common/detection_metrics.h"
#include "dtrain/common/logging.h"
#include "dtrain/data/fashion_mnist.h"
#include "dtrain/data/snaps.h"
#include "dtrain/indexer/snap_index.h"
#include "dtrain/models/detector.h"
#include "dtrain/worker/detector_trainer.h"

namespace fs = std::filesystem;
using dtrain::Status;
using namespace dtrain::indexer;
using Clock = dtrain::bench::Clock;
using dtrain::bench::Since;

namespace {

void Check(const Status& st, const char* what) { dtrain::bench::CheckOrExit("bench_snaps", st, what); }

struct ModeRow {
  SnapBoxes boxes;
  float pixel_weight = 0;
  float instance_weight = 0;
  SnapIndexSummary summary;
  double recall1 = 0, recall5 = 0, precision5_matched = 0, precision5_holds = 0, category_accuracy = -1;
  double p50_ms = 0, p99_ms = 0;
  std::vector<double> recall5_per_category;
  std::vector<double> precision5_per_category;  // matched item
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_snaps: detector AP and snap retrieval with detected, ground-truth and whole-snap items",
               "bench_snaps"};
  std::string detector, embedder, config_path, out = "bench/results/snaps.json", work = "/tmp/dtrain_bench_snaps";
  std::vector<std::string> embedder_for;
  int64_t n_snaps = 1000, n_queries = 2000, timed = 200;
  int threads = 0;
  float min_score = 0.3f;
  std::vector<float> pixel_weights = {0.f, SnapIndexOptions().pixel_weight};
  app.add_option("--detector", detector, "detector run directory (or model file)")->required();
  app.add_option("--embedder", embedder, "embedder run directory or model file, shared by every category");
  app.add_option("--embedder-for", embedder_for, "CATEGORY=RUN_DIR: one category's embedder (repeatable)");
  app.add_option("--config", config_path,
                 "job config whose data.snaps makes the evaluation snaps (default: the detector run's "
                 "config.textproto, else configs/detector_snaps.textproto)");
  app.add_option("--snaps", n_snaps, "evaluation snaps")->capture_default_str();
  app.add_option("--queries", n_queries, "query images (clean sources of the snaps' items)")->capture_default_str();
  app.add_option("--timed", timed, "queries timed one by one, per mode")->capture_default_str();
  app.add_option("--min-score", min_score, "detected boxes: lowest score indexed")->capture_default_str();
  app.add_option("--pixel-weights", pixel_weights,
                 "template (pixel) weights to query each index with (rows; the first two make the goals line)")
      ->capture_default_str();
  int rerank_depth = SnapQueryOptions().rerank_depth;
  std::vector<float> instance_weights = {SnapQueryOptions().instance_weight};
  float instance_threshold = SnapQueryOptions().instance_threshold;
  app.add_option("--instance-weights", instance_weights,
                 "instance bonus weights to query with when the pixel weight is > 0 (rows)")
      ->capture_default_str();
  app.add_option("--instance-threshold", instance_threshold, "template similarity where the instance bonus starts")
      ->capture_default_str();
  float instance_margin = SnapQueryOptions().instance_margin;
  app.add_option("--instance-margin", instance_margin, "instance bonus only within this of the best template")
      ->capture_default_str();
  app.add_option("--rerank-depth", rerank_depth, "items re-ranked by their templates per query (at least)")
      ->capture_default_str();
  std::vector<std::string> box_modes = {"detected", "truth", "whole"};
  app.add_option("--boxes", box_modes, "snap indexes to build: detected, truth, whole")->capture_default_str();
  app.add_option("--threads", threads, "torch threads (0: every core)")->capture_default_str();
  app.add_option("--work", work, "scratch directory for the indexes")->capture_default_str();
  app.add_option("--out", out, "JSON output")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (embedder.empty() && embedder_for.empty()) {
    std::fprintf(stderr, "bench_snaps: give --embedder RUN_DIR (or --embedder-for CATEGORY=RUN_DIR ...)\n");
    return 2;
  }
  dtrain::LoggingOptions lo;
  lo.level = "warn";
  Check(dtrain::InitLogging(lo), "logging");

  // The evaluation snaps.
  if (config_path.empty()) {
    const fs::path beside = fs::is_directory(detector) ? fs::path(detector) / "config.textproto"
                                                       : fs::path(detector).parent_path() / "config.textproto";
    config_path = fs::exists(beside) ? beside.string() : "configs/detector_snaps.textproto";
  }
  dtrain::JobConfig config;
  Check(dtrain::LoadJobConfig(config_path, {}, &config), "job config");
  config.mutable_data()->mutable_snaps()->set_eval_count(n_snaps);
  std::vector<dtrain::data::Snap> snaps;
  Check(dtrain::worker::LoadEvalSnaps(config, &snaps), "evaluation snaps");
  dtrain::data::FashionMnistOptions fo;
  fo.split = dtrain::data::Split::kTest;
  if (!config.data().dir().empty()) fo.dir = config.data().dir();
  dtrain::data::Dataset test;
  Check(dtrain::data::LoadFashionMnist(fo, &test), "test split");
  if (threads > 0) torch::set_num_threads(threads);

  // 1. Detector AP.
  dtrain::models::CenterNet model{nullptr};
  dtrain::ModelConfig model_config;
  Check(dtrain::worker::LoadDetector(detector, &model, &model_config), "detector");
  const std::vector<std::string> categories = dtrain::models::DetectorCategories(model_config);
  auto t_ap = Clock::now();
  const dtrain::DetectionMetrics ap = dtrain::worker::EvaluateDetector(
      *model, categories, snaps, model_config.detector().max_detections());
  const double ap_s = Since(t_ap);
  int64_t n_items = 0;
  for (const auto& s : snaps) n_items += static_cast<int64_t>(s.items.size());
  std::printf("bench/snaps: %zu evaluation snaps (%dx%d, %lld items), detector %s, embedder %s, %u cores\n\n",
              snaps.size(), snaps.empty() ? 0 : snaps[0].cols, snaps.empty() ? 0 : snaps[0].rows,
              static_cast<long long>(n_items), detector.c_str(),
              embedder_for.empty() ? embedder.c_str() : "one per category", std::thread::hardware_concurrency());
  std::printf("detector (%.1f s, %.0f snaps/s):\n%s\n", ap_s, snaps.size() / std::max(ap_s, 1e-9),
              dtrain::DetectionTable(ap).c_str());

  // The queries: each source image once.
  std::vector<int64_t> sources;
  std::map<int64_t, std::set<size_t>> snaps_with_source;       // source index -> snap ordinals
  std::vector<std::set<int>> fine_classes_of(snaps.size());    // snap ordinal -> fine classes in it
  for (size_t i = 0; i < snaps.size(); ++i) {
    for (const auto& it : snaps[i].items) {
      if (snaps_with_source[it.source_index].empty()) sources.push_back(it.source_index);
      snaps_with_source[it.source_index].insert(i);
      fine_classes_of[i].insert(it.fine_class);
    }
  }
  if (static_cast<int64_t>(sources.size()) > n_queries) sources.resize(static_cast<size_t>(n_queries));
  std::vector<dtrain::data::GrayImage> products;
  for (int64_t s : sources) {
    dtrain::data::GrayImage g;
    g.rows = test.rows;
    g.cols = test.cols;
    g.pixels.assign(test.image(s), test.image(s) + g.rows * g.cols);
    products.push_back(std::move(g));
  }

  // 2-4. The three indexes.
  std::map<std::string, std::string> per_category;
  for (const std::string& e : embedder_for) {
    const size_t eq = e.find('=');
    if (eq == std::string::npos) Check(Status::InvalidArgument("--embedder-for " + e + ": use CATEGORY=RUN_DIR"), "flags");
    per_category[e.substr(0, eq)] = e.substr(eq + 1);
  }
  std::vector<ModeRow> rows;
  std::vector<SnapBoxes> modes;
  for (const std::string& name : box_modes) {
    SnapBoxes b;
    if (!ParseSnapBoxes(name, &b)) Check(Status::InvalidArgument("--boxes " + name + ": use detected, truth or whole"), "flags");
    modes.push_back(b);
  }
  for (SnapBoxes boxes : modes) {
    ModeRow row;
    row.boxes = boxes;
    SnapIndexOptions o;
    o.snaps = &snaps;
    o.boxes = boxes;
    o.output_dir = work + "/" + SnapBoxesName(boxes);
    o.progress = false;
    o.threads = threads;
    o.min_score = min_score;
    if (boxes == SnapBoxes::kWholeSnap) {
      o.embedder = embedder.empty() ? per_category.begin()->second : embedder;
    } else {
      o.detector = detector;
      o.embedder = embedder;
      o.category_embedders = per_category;
    }
    Check(BuildSnapIndex(o, &row.summary), SnapBoxesName(boxes));
    SnapIndexOpenOptions oo;
    oo.index_dir = o.output_dir;
    oo.threads = threads;
    std::unique_ptr<SnapIndex> index;
    Check(SnapIndex::Open(oo, &index), "opening the index");
    // The query settings: the embedding alone (pixel weight 0, no bonus),
    // and each pixel weight > 0 with each instance weight.
    std::vector<std::pair<float, float>> settings;
    for (float weight : pixel_weights) {
      if (weight > 0) {
        for (float gamma : instance_weights) settings.emplace_back(weight, gamma);
      } else {
        settings.emplace_back(0.f, 0.f);
      }
    }
    for (const auto& [weight, gamma] : settings) {
      const SnapIndexSummary summary = row.summary;
      row = ModeRow();
      row.boxes = boxes;
      row.pixel_weight = weight;
      row.instance_weight = gamma;
      row.summary = summary;
      SnapQueryOptions qo;
      qo.k = 5;
      qo.pixel_weight = weight;
      qo.instance_weight = gamma;
      qo.instance_threshold = instance_threshold;
      qo.instance_margin = instance_margin;
      qo.rerank_depth = rerank_depth;
      std::vector<SnapQueryResult> results;
      Check(index->QueryBatch(products, qo, &results), "queries");
      std::vector<double> hits_c(categories.size(), 0), count_c(categories.size(), 0);
      std::vector<double> precision_c(categories.size(), 0);
      int64_t correct_category = 0;
      for (size_t q = 0; q < products.size(); ++q) {
        const int64_t src = sources[q];
        const int fine = test.labels[static_cast<size_t>(src)];
        const int coarse = dtrain::data::CoarseCategory(fine);
        const std::set<size_t>& holders = snaps_with_source[src];
        const auto& ms = results[q].matches;
        bool hit5 = false;
        double precision5 = 0;
        for (size_t j = 0; j < ms.size(); ++j) {
          const size_t ord = static_cast<size_t>(ms[j].snap_ordinal);
          const bool holds = holders.count(ord) > 0;
          if (holds && j == 0) row.recall1 += 1;
          hit5 |= holds;
          precision5 += ms[j].fine_class == fine ? 0.2 : 0;
          row.precision5_holds += fine_classes_of[ord].count(fine) ? 0.2 : 0;
        }
        row.recall5 += hit5 ? 1 : 0;
        row.precision5_matched += precision5;
        if (coarse >= 0 && coarse < static_cast<int>(categories.size())) {
          precision_c[static_cast<size_t>(coarse)] += precision5;
          hits_c[static_cast<size_t>(coarse)] += hit5 ? 1 : 0;
          count_c[static_cast<size_t>(coarse)] += 1;
        }
        correct_category += results[q].category == coarse ? 1 : 0;
      }
      const double nq = static_cast<double>(products.size());
      row.recall1 /= nq;
      row.recall5 /= nq;
      row.precision5_matched /= nq;
      row.precision5_holds /= nq;
      if (boxes != SnapBoxes::kWholeSnap) row.category_accuracy = correct_category / nq;
      for (size_t c = 0; c < categories.size(); ++c) {
        row.recall5_per_category.push_back(count_c[c] > 0 ? hits_c[c] / count_c[c] : -1);
        row.precision5_per_category.push_back(count_c[c] > 0 ? precision_c[c] / count_c[c] : -1);
      }
      // Latency, one query at a time.
      std::vector<double> lat;
      const int64_t m = std::min<int64_t>(timed, static_cast<int64_t>(products.size()));
      for (int64_t i = 0; i < m; ++i) {
        SnapQueryResult r;
        auto t0 = Clock::now();
        Check(index->Query(products[static_cast<size_t>(i)], qo, &r), "timed query");
        lat.push_back(Since(t0) * 1e3);
      }
      if (!lat.empty()) {
        std::sort(lat.begin(), lat.end());
        row.p50_ms = lat[lat.size() / 2];
        row.p99_ms = lat[std::min(lat.size() - 1, static_cast<size_t>(0.99 * lat.size()))];
      }
      rows.push_back(row);
    }
  }

  std::printf("retrieval, %zu clean test images of the snaps' items as queries, top 5 snaps:\n", products.size());
  std::printf("%-20s %8s %9s %9s %9s %11s %11s %9s %8s %8s\n", "items", "indexed", "snaps/s", "Recall@1",
              "Recall@5", "P@5 match", "P@5 holds", "category", "p50 ms", "p99 ms");
  nlohmann::ordered_json j;
  j["bench"] = "snaps";
  j["detector"] = detector;
  j["embedder"] = embedder;
  for (const auto& [c, e] : per_category) j["embedder_for"][c] = e;
  j["config"] = config_path;
  j["snaps"] = static_cast<int64_t>(snaps.size());
  j["snap_size"] = snaps.empty() ? 0 : snaps[0].rows;
  j["items"] = n_items;
  j["queries"] = static_cast<int64_t>(products.size());
  j["cores"] = std::thread::hardware_concurrency();
  j["min_score"] = min_score;
  j["rerank_depth"] = rerank_depth;
  j["instance_threshold"] = instance_threshold;
  j["instance_margin"] = instance_margin;
  j["detector_metrics"] = {{"mean_ap50", ap.mean_ap50}, {"mean_ap75", ap.mean_ap75}, {"mean_ap", ap.mean_ap},
                           {"snaps_per_sec", snaps.size() / std::max(ap_s, 1e-9)}};
  for (size_t c = 0; c < ap.categories.size(); ++c) {
    j["detector_metrics"]["per_category"].push_back({{"category", ap.categories[c]},
                                                     {"ground_truth", ap.ground_truth[c]},
                                                     {"detections", ap.detections[c]},
                                                     {"ap50", ap.ap50[c]},
                                                     {"ap75", ap.ap75[c]},
                                                     {"ap", ap.ap[c]}});
  }
  for (const ModeRow& r : rows) {
    char cat[16] = "-", matched[16] = "-";
    if (r.category_accuracy >= 0) std::snprintf(cat, sizeof cat, "%.4f", r.category_accuracy);
    if (r.boxes != SnapBoxes::kWholeSnap) std::snprintf(matched, sizeof matched, "%.4f", r.precision5_matched);
    std::string name = SnapBoxesName(r.boxes);
    if (r.pixel_weight == SnapIndexOptions().pixel_weight &&
        r.instance_weight == SnapQueryOptions().instance_weight) {
      name += "+pixels";
    } else if (r.pixel_weight > 0) {
      char w[32];
      std::snprintf(w, sizeof w, "+pixels%.2f/%.2f", r.pixel_weight, r.instance_weight);
      name += w;
    }
    std::printf("%-20s %8lld %9.1f %9.4f %9.4f %11s %11.4f %9s %8.2f %8.2f\n", name.c_str(),
                static_cast<long long>(r.summary.items), r.summary.snaps_per_sec, r.recall1, r.recall5, matched,
                r.precision5_holds, cat, r.p50_ms, r.p99_ms);
    nlohmann::ordered_json x;
    x["row"] = name;
    x["boxes"] = SnapBoxesName(r.boxes);
    x["pixel_weight"] = r.pixel_weight;
    x["instance_weight"] = r.instance_weight;
    x["items_indexed"] = r.summary.items;
    x["index_seconds"] = r.summary.index_seconds;
    x["snaps_per_sec"] = r.summary.snaps_per_sec;
    x["recall_at_1"] = r.recall1;
    x["recall_at_5"] = r.recall5;
    if (r.boxes != SnapBoxes::kWholeSnap) x["precision_at_5_matched_item"] = r.precision5_matched;
    x["precision_at_5_snap_holds"] = r.precision5_holds;
    if (r.category_accuracy >= 0) x["category_accuracy"] = r.category_accuracy;
    if (r.boxes != SnapBoxes::kWholeSnap) {
      for (size_t c = 0; c < categories.size(); ++c) {
        x["recall_at_5_per_category"][categories[c]] = r.recall5_per_category[c];
        x["precision_at_5_per_category"][categories[c]] = r.precision5_per_category[c];
      }
    }
    x["query_p50_ms"] = r.p50_ms;
    x["query_p99_ms"] = r.p99_ms;
    j["retrieval"].push_back(x);
  }
  std::printf("\n(Recall@K: a snap holding the query's very source image in the top K; P@5 match: matched item of "
              "the query's fine class; P@5 holds: snap holds an item of that class; category: detector's "
              "prediction for the product centred on a blank snap)\n");
  std::printf("goals: AP50 >= 0.97 (%.4f), COCO AP >= 0.80 (%.4f), detected+pixels Recall@5 >= 0.90 (%.4f), P@5 >= "
              "0.90 (%.4f)\n",
              ap.mean_ap50, ap.mean_ap, rows[std::min<size_t>(1, rows.size() - 1)].recall5,
              rows[std::min<size_t>(1, rows.size() - 1)].precision5_matched);
  fs::create_directories(fs::path(out).parent_path().empty() ? fs::path(".") : fs::path(out).parent_path());
  std::ofstream(out) << j.dump(2) << "\n";
  std::printf("written to %s\n", out.c_str());
  std::error_code ec;
  fs::remove_all(work, ec);
  return 0;
}
