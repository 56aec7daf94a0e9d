#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/coordinator/cli.h"
#include "dtrain/data/fashion_mnist.h"
#include "dtrain/indexer/image_io.h"

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
    indexer::GrayImage img;
    img.rows = ds.rows;
    img.cols = ds.cols;
    img.pixels.assign(ds.image(i), ds.image(i) + static_cast<size_t>(ds.rows) * ds.cols);
    const std::string path = (std::filesystem::path(a.out) / cls /
                              (a.split + "_" + std::to_string(i) + ".png")).string();
    DTRAIN_RETURN_IF_ERROR(indexer::WriteGrayPng(path, img));
  }
  std::printf("wrote %lld %s images to %s/<class>/\n", static_cast<long long>(ds.size), a.split.c_str(),
              a.out.c_str());
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
}

}  // namespace dtrain::cli
