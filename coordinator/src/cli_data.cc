#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/common/progress.h"
#include "dtrain/coordinator/cli.h"
#include "dtrain/data/fashion_mnist.h"
#include "dtrain/data/image_io.h"
#include "dtrain/data/snaps.h"

namespace dtrain::cli {
namespace {

struct DataArgs {
  std::string dir = "/usr/share/datasets/fashion-mnist";
  std::string split = "all";
  int64_t limit = 0;
};

Status PrintSummary(const DataArgs& args) {
  std::vector<data::Split> splits;
  if (args.split == "train" || args.split == "all") splits.push_back(data::Split::kTrain);
  if (args.split == "test" || args.split == "all") splits.push_back(data::Split::kTest);

  std::vector<data::DatasetSummary> summaries;
  for (data::Split s : splits) {
    data::FashionMnistOptions opt;
    opt.dir = args.dir;
    opt.split = s;
    opt.limit = args.limit;
    data::Dataset ds;
    DTRAIN_RETURN_IF_ERROR(data::LoadFashionMnist(opt, &ds));
    summaries.push_back(data::Summarize(ds));
  }
  std::printf("Fashion-MNIST in %s\n\n", args.dir.c_str());
  std::printf("%-14s", "class");
  for (data::Split s : splits) std::printf(" %10s", data::SplitName(s));
  std::printf("\n");
  const auto& names = data::ClassNames();
  for (size_t c = 0; c < names.size(); ++c) {
    std::printf("%-14s", (std::to_string(c) + " " + names[c]).c_str());
    for (const auto& sm : summaries) std::printf(" %10lld", static_cast<long long>(sm.per_class[c]));
    std::printf("\n");
  }
  std::printf("%-14s", "total");
  for (const auto& sm : summaries) std::printf(" %10lld", static_cast<long long>(sm.size));
  std::printf("\n%-14s", "image size");
  for (const auto& sm : summaries) std::printf(" %10s", (std::to_string(sm.rows) + "x" + std::to_string(sm.cols)).c_str());
  std::printf("\n%-14s", "pixel mean");
  for (const auto& sm : summaries) std::printf(" %10.4f", sm.pixel_mean);
  std::printf("\n%-14s", "pixel std");
  for (const auto& sm : summaries) std::printf(" %10.4f", sm.pixel_std);
  std::printf("\n");
  return Status::OK();
}

struct ExportArgs {
  std::string dir = "/usr/share/datasets/fashion-mnist";
  std::string split = "test";
  int64_t limit = 100;
  std::string out;
};

// Writes images as 8-bit grayscale PNGs, OUT/<class>/<split>_<index>.png: a
// catalogue in the layout a directory gallery reads (docs/indexer.md).
Status ExportPngs(const ExportArgs& a) {
  data::FashionMnistOptions opt;
  opt.dir = a.dir;
  opt.split = a.split == "train" ? data::Split::kTrain : data::Split::kTest;
  opt.limit = a.limit;
  data::Dataset ds;
  DTRAIN_RETURN_IF_ERROR(data::LoadFashionMnist(opt, &ds));
  for (int64_t i = 0; i < ds.size; ++i) {
    std::string cls = data::ClassNames()[ds.labels[static_cast<size_t>(i)]];
    for (char& c : cls) c = c == '/' ? '_' : c;  // "T-shirt/top"
    data::GrayImage img;
    img.rows = ds.rows;
    img.cols = ds.cols;
    img.pixels.assign(ds.image(i), ds.image(i) + static_cast<size_t>(ds.rows) * ds.cols);
    const std::string path = (std::filesystem::path(a.out) / cls /
                              (a.split + "_" + std::to_string(i) + ".png")).string();
    DTRAIN_RETURN_IF_ERROR(data::WriteGrayPng(path, img));
  }
  std::printf("wrote %lld %s images to %s/<class>/\n", static_cast<long long>(ds.size), a.split.c_str(),
              a.out.c_str());
  return Status::OK();
}

struct SnapArgs {
  std::string dir = "/usr/share/datasets/fashion-mnist";
  std::string split;
  std::string out;
  int64_t count = 0;
  data::SnapOptions options;
  bool no_progress = false;
};

// Generates snaps 0..count-1 from one split and writes them, with COCO
// annotations, as a snap directory; prints what it wrote.
Status WriteSnaps(const SnapArgs& a) {
  data::FashionMnistOptions fo;
  fo.dir = a.dir;
  fo.split = a.split == "train" ? data::Split::kTrain : data::Split::kTest;
  data::Dataset ds;
  DTRAIN_RETURN_IF_ERROR(data::LoadFashionMnist(fo, &ds));
  data::SnapGenerator gen;
  DTRAIN_RETURN_IF_ERROR(data::SnapGenerator::Create(ds, a.options, &gen));
  const auto& names = data::CoarseCategoryNames();
  data::SnapDirectoryWriter writer;
  DTRAIN_RETURN_IF_ERROR(
      data::SnapDirectoryWriter::Open(a.out, std::vector<std::string>(names.begin(), names.end()), &writer));

  std::unique_ptr<ProgressBar> bar;
  if (!a.no_progress && a.count >= 1000) {
    ProgressOptions po;
    po.label = "snaps";
    po.total = a.count;
    bar = std::make_unique<ProgressBar>(po);
  }
  const auto t0 = std::chrono::steady_clock::now();
  std::array<int64_t, 4> per_category{};
  std::array<int64_t, 10> per_class{};
  int64_t items = 0;
  for (int64_t key = 0; key < a.count; ++key) {
    const data::Snap snap = gen.Generate(key);
    DTRAIN_RETURN_IF_ERROR(writer.Add(snap));
    for (const data::SnapItem& it : snap.items) {
      ++per_category[static_cast<size_t>(it.category)];
      ++per_class[static_cast<size_t>(it.fine_class)];
      ++items;
    }
    if (bar && ((key + 1) % 100 == 0 || key + 1 == a.count)) bar->Update(key + 1);
  }
  DTRAIN_RETURN_IF_ERROR(writer.Finish());
  if (bar) bar->Finish();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  const data::SnapOptions& o = a.options;
  std::printf("wrote %lld snaps (%dx%d, %d-%d items, %s split, seed %llu) to %s in %.1f s\n",
              static_cast<long long>(a.count), o.canvas, o.canvas, o.min_items, o.max_items, a.split.c_str(),
              static_cast<unsigned long long>(o.seed), a.out.c_str(), secs);
  std::printf("items: %lld, %.2f per snap\n\n", static_cast<long long>(items),
              static_cast<double>(items) / static_cast<double>(a.count));
  std::printf("%-10s %8s  classes\n", "category", "items");
  for (size_t c = 0; c < names.size(); ++c) {
    std::string classes;
    for (int f = 0; f < 10; ++f) {
      if (data::CoarseCategory(f) != static_cast<int>(c)) continue;
      if (!classes.empty()) classes += ", ";
      classes += std::string(data::ClassNames()[static_cast<size_t>(f)]) + " " + std::to_string(per_class[static_cast<size_t>(f)]);
    }
    std::printf("%-10s %8lld  %s\n", names[c], static_cast<long long>(per_category[c]), classes.c_str());
  }
  std::printf("\nannotations (COCO): %s/annotations.json\n", a.out.c_str());
  return Status::OK();
}

}  // namespace

void AddDataCommands(CLI::App& app, int* exit_code) {
  CLI::App* data_cmd = app.add_subcommand("data", "inspect training data");
  data_cmd->require_subcommand(1);
  auto args = std::make_shared<DataArgs>();
  CLI::App* summary = data_cmd->add_subcommand(
      "summary", "read Fashion-MNIST (checking magic numbers, counts and sizes) and print per-class counts");
  summary->add_option("--dir", args->dir, "directory with the IDX files")->capture_default_str();
  summary->add_option("--split", args->split, "train, test or all")
      ->check(CLI::IsMember({"train", "test", "all"}))
      ->capture_default_str();
  summary->add_option("--limit", args->limit, "read only the first N images of each split (0 = all)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  summary->callback([args, exit_code] {
    Status st = PrintSummary(*args);
    if (!st.ok()) {
      std::fprintf(stderr, "dtrain data summary: %s\n", st.ToString().c_str());
      *exit_code = 1;
    }
  });

  auto ex = std::make_shared<ExportArgs>();
  CLI::App* png = data_cmd->add_subcommand(
      "export-png", "write Fashion-MNIST images as PNG files, OUT/<class>/<split>_<index>.png (a sample catalogue "
                    "for directory galleries and image queries)");
  png->add_option("--dir", ex->dir, "directory with the IDX files")->capture_default_str();
  png->add_option("--split", ex->split, "train or test")->check(CLI::IsMember({"train", "test"}))->capture_default_str();
  png->add_option("--limit", ex->limit, "the first N images (0 = all)")->check(CLI::NonNegativeNumber)->capture_default_str();
  png->add_option("--out", ex->out, "output directory")->required();
  png->callback([ex, exit_code] {
    Status st = ExportPngs(*ex);
    if (!st.ok()) {
      std::fprintf(stderr, "dtrain data export-png: %s\n", st.ToString().c_str());
      *exit_code = 1;
    }
  });

  auto sn = std::make_shared<SnapArgs>();
  CLI::App* snaps = data_cmd->add_subcommand(
      "snaps", "generate synthetic street snaps (Fashion-MNIST items on a textured canvas) as PNG files with COCO "
               "annotations (OUT/snap_<n>.png, OUT/annotations.json); train snaps use only the train split, test "
               "snaps only the test split");
  snaps->add_option("--out", sn->out, "output directory (created; an older annotations.json there is replaced)")
      ->required();
  snaps->add_option("--count", sn->count, "number of snaps (keys 0..N-1)")->required()->check(CLI::PositiveNumber);
  snaps->add_option("--split", sn->split, "the Fashion-MNIST split the items come from: train or test")
      ->required()
      ->check(CLI::IsMember({"train", "test"}));
  snaps->add_option("--seed", sn->options.seed, "generator seed: the same seed and key give the same snap")
      ->capture_default_str();
  snaps->add_option("--canvas", sn->options.canvas, "canvas side in pixels (square, grayscale)")->capture_default_str();
  snaps->add_option("--min-items", sn->options.min_items, "fewest items per snap")->capture_default_str();
  snaps->add_option("--max-items", sn->options.max_items, "most items per snap")->capture_default_str();
  snaps->add_option("--min-scale", sn->options.min_scale, "smallest item scale (of its 28 px image)")
      ->capture_default_str();
  snaps->add_option("--max-scale", sn->options.max_scale, "largest item scale")->capture_default_str();
  snaps->add_option("--max-overlap", sn->options.max_overlap, "largest IoU between two items' placed squares")
      ->capture_default_str();
  snaps->add_option("--dir", sn->dir, "directory with the Fashion-MNIST IDX files")->capture_default_str();
  snaps->add_flag("--no-progress", sn->no_progress, "no progress bar");
  snaps->callback([sn, exit_code] {
    Status st = WriteSnaps(*sn);
    if (!st.ok()) {
      std::fprintf(stderr, "dtrain data snaps: %s\n", st.ToString().c_str());
      *exit_code = 1;
    }
  });
}

}  // namespace dtrain::cli
