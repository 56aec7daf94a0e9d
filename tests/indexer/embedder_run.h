// Shared by the indexer tests: a run directory as a finished embedder job
// leaves it (config.textproto + an untrained model.pt).
#pragma once

#include <google/protobuf/text_format.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "dtrain/common/config.h"
#include "dtrain/models/registry.h"
#include "dtrain/worker/trainer.h"

namespace dtrain::indexer::testing {

// Writes the run `run` (named by its last component) of a [8, 16]-wide
// embedder of `embedding_dim`, with `extra` appended to its config text.
inline JobConfig MakeEmbedderRun(const std::filesystem::path& run, int embedding_dim, const std::string& extra = "") {
  JobConfig config;
  Status st = ParseJobConfig("name: \"" + run.filename().string() + "\" model { widths: [8, 16] embedding_dim: " +
                                 std::to_string(embedding_dim) + " } " + extra,
                             "test", {"run_dir=" + run.string()}, &config);
  EXPECT_TRUE(st.ok()) << st;
  std::filesystem::create_directories(run);
  std::string text;
  google::protobuf::TextFormat::PrintToString(config, &text);
  std::ofstream(run / "config.textproto") << text;
  models::Embedder model{nullptr};
  EXPECT_TRUE(models::BuildEmbedder(config.model(), &model).ok());
  EXPECT_TRUE(worker::SaveModel(*model, config.model(), (run / "model.pt").string()).ok());
  return config;
}

}  // namespace dtrain::indexer::testing
