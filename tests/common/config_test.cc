#include "dtrain/common/config.h"

#include <gmock/gmock.h>
#include <google/protobuf/util/message_differencer.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

namespace dtrain {
namespace {

using ::testing::HasSubstr;

Status Parse(const std::string& text, const std::vector<std::string>& overrides = {}, JobConfig* out = nullptr) {
  JobConfig job;
  return ParseJobConfig(text, "job.textproto", overrides, out ? out : &job);
}

// A valid minimal config: only the name is required.
constexpr const char* kMinimal = "name: \"t\"\n";

TEST(ConfigTest, MinimalConfigGetsDocumentedDefaults) {
  JobConfig job;
  ASSERT_TRUE(Parse(kMinimal, {}, &job).ok());
  EXPECT_EQ(job.run_dir(), "runs/t");
  EXPECT_EQ(job.checkpoint().dir(), "runs/t/store");
  EXPECT_EQ(job.parallelism().mode_case(), ParallelismConfig::kSync);
  EXPECT_EQ(job.model().embedding_dim(), 128);
  EXPECT_THAT(std::vector<int>(job.model().widths().begin(), job.model().widths().end()),
              ::testing::ElementsAre(32, 64, 128));
  EXPECT_FLOAT_EQ(job.loss().arcface().scale(), 16.0f);
  EXPECT_EQ(job.data().batch_size(), 256);
  EXPECT_EQ(job.launch().bind_address(), "127.0.0.1");
  // Defaults are written out explicitly, so the resolved config shows them.
  EXPECT_TRUE(job.optimizer().has_lr());
  EXPECT_THAT(FormatJobConfig(job), HasSubstr("lr: 0.1"));
}

TEST(ConfigTest, ResolvedConfigRoundTrips) {
  JobConfig job;
  ASSERT_TRUE(Parse(std::string(kMinimal) + "parallelism { async { shards: 2 max_staleness: 3 } }\n"
                    "model { widths: [16, 32] }\n",
                    {"optimizer.lr=0.05"}, &job)
                  .ok());
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "dtrain_config_roundtrip";
  std::filesystem::remove_all(dir);
  const std::string path = (dir / "sub" / "config.textproto").string();
  ASSERT_TRUE(WriteResolvedConfig(job, path).ok());
  JobConfig again;
  Status st = LoadJobConfig(path, {}, &again);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(job, again));
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  std::filesystem::remove_all(dir);
}

TEST(ConfigTest, ShippedConfigsAreValid) {
  for (const char* name : {"sync_arcface", "sync_triplet", "async_arcface", "pipeline_arcface"}) {
    JobConfig job;
    Status st = LoadJobConfig(std::string(DTRAIN_SOURCE_DIR) + "/configs/" + name + ".textproto", {}, &job);
    EXPECT_TRUE(st.ok()) << name << ": " << st;
    EXPECT_EQ(job.name(), name);
  }
}

// ---- overrides -----------------------------------------------------------------

TEST(ConfigTest, OverridesAreTypedBySchema) {
  JobConfig job;
  Status st = Parse(kMinimal,
                    {"optimizer.lr=0.05", "data.augment.hflip=false", "optimizer.kind=adamw",
                     "model.widths=[8,16,32,64]", "name=other", "index.gallery=/data/catalogue"},
                    &job);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_FLOAT_EQ(job.optimizer().lr(), 0.05f);
  EXPECT_FALSE(job.data().augment().hflip());
  EXPECT_EQ(job.optimizer().kind(), OptimizerConfig::ADAMW);
  EXPECT_EQ(job.model().widths_size(), 4);
  EXPECT_EQ(job.name(), "other");
  EXPECT_EQ(job.run_dir(), "runs/other");
  EXPECT_EQ(job.index().gallery(), "/data/catalogue");
}

TEST(ConfigTest, OverrideInsideOneofSwitchesMode) {
  JobConfig job;
  ASSERT_TRUE(Parse(std::string(kMinimal) + "parallelism { sync { bucket_size_mb: 4 } }",
                    {"parallelism.async.max_staleness=2"}, &job)
                  .ok());
  EXPECT_EQ(job.parallelism().mode_case(), ParallelismConfig::kAsync);
  EXPECT_EQ(job.parallelism().async().max_staleness(), 2);
  EXPECT_EQ(job.parallelism().async().shards(), 1);  // defaults filled in the new member

  ASSERT_TRUE(Parse(kMinimal, {"parallelism.pipeline={stages: 3 micro_batches: 4}", "launch.workers=3"}, &job).ok());
  EXPECT_EQ(job.parallelism().mode_case(), ParallelismConfig::kPipeline);
  EXPECT_EQ(job.parallelism().pipeline().stages(), 3);
}

TEST(ConfigTest, OverrideOfUnknownFieldListsTheFields) {
  Status st = Parse(kMinimal, {"optimizer.lrr=0.1"});
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("--set optimizer.lrr=0.1: optimizer has no field 'lrr'"));
  EXPECT_THAT(st.message(), HasSubstr("lr, momentum"));
}

TEST(ConfigTest, OverrideWithBadValueNamesTypeAndValue) {
  Status st = Parse(kMinimal, {"optimizer.lr=fast"});
  EXPECT_THAT(st.message(), HasSubstr("optimizer.lr: cannot parse 'fast' as float"));
  st = Parse(kMinimal, {"parallelism.pipeline.schedule=zigzag"});
  EXPECT_THAT(st.message(), HasSubstr("'zigzag' is not one of GPIPE, ONE_F_ONE_B"));
  st = Parse(kMinimal, {"optimizer"});
  EXPECT_THAT(st.message(), HasSubstr("expected FIELD.PATH=VALUE"));
  st = Parse(kMinimal, {"optimizer.lr.x=1"});
  EXPECT_THAT(st.message(), HasSubstr("optimizer.lr is a float, it has no field 'x'"));
}

TEST(ConfigTest, OverrideIsNamedInValidationErrors) {
  Status st = Parse(kMinimal, {"parallelism.async.max_staleness=-1"});
  EXPECT_THAT(st.message(), HasSubstr("--set parallelism.async.max_staleness=-1: "
                                      "parallelism.async.max_staleness: must be >= 0, got -1"));
}

// ---- bad configs: each names where and what ---------------------------------------

struct BadConfig {
  const char* what;
  const char* text;
  const char* expected;  // substring of the error
};

class BadConfigTest : public ::testing::TestWithParam<BadConfig> {};

TEST_P(BadConfigTest, GivesClearError) {
  const BadConfig& bad = GetParam();
  Status st = Parse(bad.text);
  ASSERT_FALSE(st.ok()) << bad.what;
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr(bad.expected)) << bad.what << "\nfull message:\n" << st.message();
}

INSTANTIATE_TEST_SUITE_P(
    Config, BadConfigTest,
    ::testing::Values(
        BadConfig{"syntax error", "name: \"t\"\nmodel {\n  embedding_dim 12x\n}\n", "job.textproto:3:17:"},
        BadConfig{"unknown field", "name: \"t\"\ndata { batchsize: 3 }\n",
                  "job.textproto:2:17: Message type \"dtrain.DataConfig\" has no field named \"batchsize\""},
        BadConfig{"negative staleness",
                  "name: \"t\"\nparallelism {\n  async {\n    max_staleness: -1\n  }\n}\n",
                  "job.textproto:4:5: parallelism.async.max_staleness: must be >= 0, got -1"},
        BadConfig{"missing name", "model { embedding_dim: 64 }\n", "job.textproto: name: is required"},
        BadConfig{"bad name", "name: \"a/b\"\n", "job.textproto:1:1: name: may hold only letters"},
        BadConfig{"zero lr", "name: \"t\"\noptimizer { lr: 0 }\n",
                  "job.textproto:2:13: optimizer.lr: must be > 0, got 0"},
        BadConfig{"PK batch mismatch", "name: \"t\"\ndata { sampler: PK pk_classes: 8 pk_images: 4 batch_size: 64 }\n",
                  "data.batch_size: the PK sampler needs batch_size = pk_classes x pk_images = 8 x 4 = 32, got 64"},
        BadConfig{"triplet without PK", "name: \"t\"\nloss { name: \"triplet\" }\n",
                  "data.sampler: loss.name \"triplet\" needs sampler: PK"},
        BadConfig{"micro-batches do not divide batch",
                  "name: \"t\"\ndata { batch_size: 100 }\nparallelism { pipeline { micro_batches: 8 } }\nlaunch { workers: 2 }\n",
                  "parallelism.pipeline.micro_batches: must divide data.batch_size (100), got 8"},
        BadConfig{"layers per stage count",
                  "name: \"t\"\nparallelism { pipeline { stages: 2 layers_per_stage: [1, 2, 3] } }\nlaunch { workers: 2 }\n",
                  "parallelism.pipeline.layers_per_stage: needs one count per stage (2), got 3"},
        BadConfig{"pipeline workers", "name: \"t\"\nparallelism { pipeline { stages: 2 } }\nlaunch { workers: 3 }\n",
                  "launch.workers: a pipeline job needs workers = replicas x stages"},
        BadConfig{"heartbeat timeout", "name: \"t\"\nlaunch { heartbeat_interval_s: 5 heartbeat_timeout_s: 5 }\n",
                  "launch.heartbeat_timeout_s: must exceed heartbeat_interval_s (5), got 5"},
        BadConfig{"hostfile with local launcher", "name: \"t\"\nlaunch { hostfile: \"hosts\" }\n",
                  "job.textproto:2:10: launch.hostfile: is only used with launcher: MPIRUN"},
        BadConfig{"nprobe above nlist", "name: \"t\"\nindex { ivf_nlist: 8 ivf_nprobe: 9 }\n",
                  "index.ivf_nprobe: must be in [1, 8], got 9"},
        BadConfig{"negative width in list", "name: \"t\"\nmodel { widths: [16, -4] }\n",
                  "job.textproto:2:9: model.widths[1]: must be in [1, 4096], got -4"},
        BadConfig{"duplicate field", "name: \"t\"\nname: \"u\"\n", "job.textproto:2:5:"},
        BadConfig{"unknown enum value", "name: \"t\"\noptimizer { kind: LION }\n",
                  "Unknown enumeration value of \"LION\" for field \"kind\""},
        BadConfig{"global mining in async mode",
                  "name: \"t\"\nloss { triplet { mining_scope: GLOBAL } }\nparallelism { async {} }\n",
                  "loss.triplet.mining_scope: GLOBAL mining needs parallelism.sync, got async"},
        BadConfig{"step schedule without milestones", "name: \"t\"\nschedule { kind: STEP }\n",
                  "schedule.milestones: kind STEP needs at least one milestone"},
        BadConfig{"class out of range", "name: \"t\"\ndata {\n  classes: [0, 10]\n}\n",
                  "job.textproto:3:3: data.classes: Fashion-MNIST classes are 0-9, got 10"},
        BadConfig{"class twice", "name: \"t\"\ndata { classes: [5, 7, 5] }\n",
                  "data.classes: class 5 is listed twice"},
        BadConfig{"PK classes above kept classes",
                  "name: \"t\"\ndata { sampler: PK pk_classes: 4 pk_images: 8 batch_size: 32 classes: [5, 7, 9] }\n",
                  "data.pk_classes: the PK sampler draws 4 classes per batch but data.classes keeps 3"},
        BadConfig{"classes for the detector",
                  "name: \"t\"\nmodel { name: \"centernet_detector\" }\ndata { dataset: \"fashion_mnist_snaps\" classes: [1] }\n",
                  "data.classes: keeps classes for an embedder"},
        BadConfig{"NCCL on CPU", "name: \"t\"\ndevice: DEVICE_CPU\nparallelism { sync { backend: BACKEND_NCCL } }\n",
                  "parallelism.sync.backend: NCCL works on CUDA tensors"}),
    [](const ::testing::TestParamInfo<BadConfig>& info) {
      std::string n;
      for (char c : std::string(info.param.what)) n += std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
      return n;
    });

TEST(ConfigTest, AllProblemsAreReportedTogether) {
  Status st = Parse("name: \"t\"\noptimizer { lr: -1 momentum: 1.5 }\ncheckpoint { keep_last: 0 }\n");
  EXPECT_THAT(st.message(), HasSubstr("3 problems in the job config"));
  EXPECT_THAT(st.message(), HasSubstr("optimizer.lr: must be > 0, got -1"));
  EXPECT_THAT(st.message(), HasSubstr("optimizer.momentum: must be in [0, 1), got 1.5"));
  EXPECT_THAT(st.message(), HasSubstr("job.textproto:3:14: checkpoint.keep_last: must be >= 1, got 0"));
}

TEST(ConfigTest, MissingFileIsNotFound) {
  JobConfig job;
  Status st = LoadJobConfig("/nonexistent/job.textproto", {}, &job);
  EXPECT_EQ(st.code(), Status::Code::kNotFound);
  EXPECT_THAT(st.message(), HasSubstr("/nonexistent/job.textproto"));
}

TEST(ConfigTest, ValidateWithoutSourceStillNamesField) {
  JobConfig job;
  job.set_name("t");
  FillDefaults(&job);
  EXPECT_TRUE(ValidateJobConfig(job).ok());
  job.mutable_data()->set_batch_size(0);
  EXPECT_THAT(ValidateJobConfig(job).message(), HasSubstr("data.batch_size: must be in [1, 1048576], got 0"));
}

}  // namespace
}  // namespace dtrain
