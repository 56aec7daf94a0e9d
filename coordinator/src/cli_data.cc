#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/coordinator/cli.h"
#include "dtrain/data/fashion_mnist.h"

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
}

}  // namespace dtrain::cli
