#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/common/config.h"
#include "dtrain/coordinator/cli.h"

namespace dtrain::cli {
namespace {

struct ConfigArgs {
  std::string config;
  std::vector<std::string> overrides;
  std::string out;
};

void AddConfigArgs(CLI::App* cmd, ConfigArgs* args) {
  cmd->add_option("CONFIG", args->config, "job config in protobuf text format (configs/*.textproto)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--set", args->overrides, "override a field: --set optimizer.lr=0.05 (repeatable)")
      ->allow_extra_args(false);
}

}  // namespace

void AddConfigCommands(CLI::App& app, int* exit_code) {
  CLI::App* config = app.add_subcommand("config", "check or print a job config");
  config->require_subcommand(1);

  auto check_args = std::make_shared<ConfigArgs>();
  CLI::App* check = config->add_subcommand(
      "check", "parse, override, fill defaults and validate a job config; exit 0 when it is valid");
  AddConfigArgs(check, check_args.get());
  check->callback([check_args, exit_code] {
    JobConfig job;
    Status st = LoadJobConfig(check_args->config, check_args->overrides, &job);
    if (!st.ok()) {
      std::fprintf(stderr, "%s\n", st.message().c_str());
      *exit_code = 1;
      return;
    }
    std::printf("%s: valid: job '%s', %s, model %s, loss %s, %d worker(s), run dir %s\n",
                check_args->config.c_str(), job.name().c_str(), ParallelismModeName(job),
                job.model().name().c_str(), job.loss().name().c_str(), job.launch().workers(),
                job.run_dir().c_str());
  });

  auto print_args = std::make_shared<ConfigArgs>();
  CLI::App* print = config->add_subcommand(
      "print", "print the resolved config (every field, defaults included) or write it with --out");
  AddConfigArgs(print, print_args.get());
  print->add_option("--out", print_args->out, "write to this file instead of standard output");
  print->callback([print_args, exit_code] {
    JobConfig job;
    Status st = LoadJobConfig(print_args->config, print_args->overrides, &job);
    if (st.ok() && !print_args->out.empty()) st = WriteResolvedConfig(job, print_args->out);
    if (!st.ok()) {
      std::fprintf(stderr, "%s\n", st.message().c_str());
      *exit_code = 1;
      return;
    }
    if (print_args->out.empty()) std::cout << FormatJobConfig(job);
  });
}

}  // namespace dtrain::cli
