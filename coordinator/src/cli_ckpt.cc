// dtrain ckpt list|inspect|export|diff: look into a checkpoint store
// (read-only, so it works while a job is writing the store).
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <map>
#include <filesystem>
#include <memory>
#include <string>

#include <google/protobuf/text_format.h>

#include "dtrain/checkpoint.pb.h"
#include "dtrain/common/config.h"
#include "dtrain/worker/trainer.h"
#include "dtrain/common/checkpoint_store.h"
#include "dtrain/coordinator/cli.h"
#include "dtrain/worker/checkpointing.h"

namespace dtrain::cli {
namespace {

struct CkptArgs {
  std::string path;    // run directory or store directory
  int64_t step = -1;   // -1: latest (for export: newest intact)
  std::string out;
};

// A run directory's store, or the directory itself when it is a store.
std::string StorePath(const std::string& path) {
  const std::filesystem::path p = std::filesystem::path(path) / "store";
  return std::filesystem::exists(p) ? p.string() : path;
}

Status OpenReadOnly(const std::string& path, std::unique_ptr<CheckpointStore>* store) {
  StoreOptions so;
  so.path = StorePath(path);
  so.read_only = true;
  so.create_if_missing = false;
  return CheckpointStore::Open(so, store);
}

std::string Time(int64_t t) {
  char buf[32];
  std::time_t tt = static_cast<std::time_t>(t);
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", std::localtime(&tt));
  return buf;
}

Status List(const CkptArgs& a) {
  std::unique_ptr<CheckpointStore> store;
  DTRAIN_RETURN_IF_ERROR(OpenReadOnly(a.path, &store));
  std::vector<CheckpointInfo> infos;
  DTRAIN_RETURN_IF_ERROR(store->List(&infos));
  std::printf("store %s (job %s)\n", StorePath(a.path).c_str(), store->owner_job_name().c_str());
  std::printf("%-8s %6s %-9s %6s %-19s %10s %8s  %s\n", "step", "epoch", "mode", "world", "saved", "MB", "tensors",
              "");
  for (const CheckpointInfo& i : infos) {
    if (!i.error.empty()) {
      std::printf("%-8lld unreadable: %s%s\n", static_cast<long long>(i.step), i.error.c_str(),
                  i.latest ? "  (latest)" : "");
      continue;
    }
    std::printf("%-8lld %6lld %-9s %6d %-19s %10.2f %8lld  %s\n", static_cast<long long>(i.step),
                static_cast<long long>(i.epoch), i.mode.c_str(), i.world_size, Time(i.wall_time).c_str(),
                static_cast<double>(i.bytes) / 1e6, static_cast<long long>(i.tensor_count), i.latest ? "latest" : "");
  }
  if (infos.empty()) std::printf("(no checkpoints)\n");
  return Status::OK();
}

Status Inspect(const CkptArgs& a) {
  std::unique_ptr<CheckpointStore> store;
  DTRAIN_RETURN_IF_ERROR(OpenReadOnly(a.path, &store));
  int64_t step = a.step;
  if (step < 0) DTRAIN_RETURN_IF_ERROR(store->LatestStep(&step));
  CheckpointManifest m;
  DTRAIN_RETURN_IF_ERROR(store->ReadManifest(step, &m));
  std::printf("checkpoint %lld of job %s\n  epoch %lld, mode %s, world size %d, saved %s\n  config digest %s\n",
              static_cast<long long>(m.step()), m.job_name().c_str(), static_cast<long long>(m.epoch()),
              m.mode().c_str(), m.world_size(), Time(m.wall_time()).c_str(), m.config_digest().c_str());
  std::printf("\n%-52s %-9s %-18s %12s %10s\n", "tensor", "dtype", "shape", "bytes", "crc32c");
  uint64_t total = 0;
  for (const TensorEntry& t : m.tensors()) {
    std::string shape = "[";
    for (int i = 0; i < t.shape_size(); ++i) shape += (i ? "," : "") + std::to_string(t.shape(i));
    shape += "]";
    std::printf("%-52s %-9s %-18s %12llu 0x%08x\n", t.name().c_str(),
                DTypeName(static_cast<DType>(t.dtype())), shape.c_str(),
                static_cast<unsigned long long>(t.byte_size()), t.crc32c());
    total += t.byte_size();
  }
  for (const SectionEntry& s : m.sections()) {
    std::printf("%-52s %-9s %-18s %12llu 0x%08x\n", ("section " + s.name()).c_str(), "-", "-",
                static_cast<unsigned long long>(s.byte_size()), s.crc32c());
    total += s.byte_size();
  }
  std::printf("\n%d tensor(s), %d section(s), %.2f MB\n", m.tensors_size(), m.sections_size(),
              static_cast<double>(total) / 1e6);
  Status v = store->Verify(step);
  if (!v.ok()) return v;
  std::printf("checksums: all verified\n");
  return Status::OK();
}

Status Export(const CkptArgs& a) {
  std::unique_ptr<CheckpointStore> store;
  DTRAIN_RETURN_IF_ERROR(OpenReadOnly(a.path, &store));
  CheckpointData data;
  if (a.step >= 0) {
    DTRAIN_RETURN_IF_ERROR(store->Load(a.step, &data));
  } else {
    std::vector<std::string> warnings;
    DTRAIN_RETURN_IF_ERROR(store->LoadLatestGood(&data, &warnings));
    for (const std::string& w : warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
  }
  // The model alone, under the names model.pt uses (worker::SaveModel).
  torch::serialize::OutputArchive archive;
  int count = 0;
  for (const TensorRecord& r : data.tensors) {
    if (r.name.rfind("model/", 0) != 0) continue;
    torch::Tensor t;
    DTRAIN_RETURN_IF_ERROR(worker::RecordToTensor(r, &t));
    archive.write(r.name.substr(6), t);
    ++count;
  }
  if (count == 0) return Status::NotFound("checkpoint " + std::to_string(data.step) + " holds no model tensors");
  // The model config travels with the model (worker::SaveModel does the same)
  // when the store sits in a run directory that has one.
  const std::filesystem::path run_config = std::filesystem::path(a.path) / "config.textproto";
  if (std::filesystem::exists(run_config)) {
    JobConfig config;
    DTRAIN_RETURN_IF_ERROR(LoadJobConfig(run_config.string(), {}, &config));
    std::string text;
    google::protobuf::TextFormat::PrintToString(config.model(), &text);
    archive.write(worker::kModelConfigKey, c10::IValue(text));
  } else {
    std::fprintf(stderr, "warning: %s has no config.textproto: the exported model carries no model config\n",
                 a.path.c_str());
  }
  const std::string tmp = a.out + ".tmp";
  try {
    archive.save_to(tmp);
  } catch (const c10::Error& e) {
    return Status::IOError("cannot write " + tmp + ": " + e.what_without_backtrace());
  }
  std::error_code ec;
  std::filesystem::rename(tmp, a.out, ec);
  if (ec) return Status::IOError("cannot rename " + tmp + " to " + a.out + ": " + ec.message());
  std::printf("exported the model of checkpoint %lld (%d tensors) to %s\n", static_cast<long long>(data.step), count,
              a.out.c_str());
  return Status::OK();
}

struct DiffArgs {
  std::string a, b;
  int64_t step_a = -1, step_b = -1;  // -1: the newest intact checkpoint
  double tolerance = 0;
  bool all = false;  // optimizer state and everything else too
};

Status LoadFor(const std::string& path, int64_t step, CheckpointData* data) {
  std::unique_ptr<CheckpointStore> store;
  DTRAIN_RETURN_IF_ERROR(OpenReadOnly(path, &store).WithContext(path));
  if (step >= 0) return store->Load(step, data).WithContext(path);
  std::vector<std::string> warnings;
  DTRAIN_RETURN_IF_ERROR(store->LoadLatestGood(data, &warnings).WithContext(path));
  for (const std::string& w : warnings) std::fprintf(stderr, "warning: %s: %s\n", path.c_str(), w.c_str());
  return Status::OK();
}

// Compares the tensors of two checkpoints (of two runs, or two steps of
// one): the model's and the loss head's ("model/", "loss/"), or every
// tensor with --all. Prints the largest absolute difference of each tensor
// that differs and a summary; FailedPrecondition when the tensor sets,
// shapes or dtypes differ or a difference exceeds the tolerance (the
// comparison of float tensors is done in double).
Status Diff(const DiffArgs& d) {
  CheckpointData a, b;
  DTRAIN_RETURN_IF_ERROR(LoadFor(d.a, d.step_a, &a));
  DTRAIN_RETURN_IF_ERROR(LoadFor(d.b, d.step_b, &b));
  std::printf("A: %s, step %lld (%s, %d rank(s))\nB: %s, step %lld (%s, %d rank(s))\n", d.a.c_str(),
              static_cast<long long>(a.step), a.mode.c_str(), a.world_size, d.b.c_str(),
              static_cast<long long>(b.step), b.mode.c_str(), b.world_size);
  auto wanted = [&](const std::string& name) {
    return d.all || name.rfind("model/", 0) == 0 || name.rfind("loss/", 0) == 0;
  };
  std::map<std::string, const TensorRecord*> in_b;
  for (const TensorRecord& r : b.tensors) {
    if (wanted(r.name)) in_b[r.name] = &r;
  }
  std::vector<std::string> problems;
  int compared = 0, differing = 0;
  int64_t elements = 0;
  double worst = 0;
  std::string worst_name;
  for (const TensorRecord& ra : a.tensors) {
    if (!wanted(ra.name)) continue;
    auto it = in_b.find(ra.name);
    if (it == in_b.end()) {
      problems.push_back(ra.name + " is only in A");
      continue;
    }
    const TensorRecord& rb = *it->second;
    in_b.erase(it);
    if (ra.shape != rb.shape || ra.dtype != rb.dtype) {
      problems.push_back(ra.name + ": shape or dtype differs");
      continue;
    }
    torch::Tensor ta, tb;
    DTRAIN_RETURN_IF_ERROR(worker::RecordToTensor(ra, &ta));
    DTRAIN_RETURN_IF_ERROR(worker::RecordToTensor(rb, &tb));
    ++compared;
    elements += ta.numel();
    if (ta.numel() == 0) continue;
    const double diff = (ta.to(torch::kFloat64) - tb.to(torch::kFloat64)).abs().max().item<double>();
    const double scale = ta.to(torch::kFloat64).abs().max().item<double>();
    if (diff > 0 || std::isnan(diff)) {
      ++differing;
      std::printf("  %-48s max |A - B| %.3g (max |A| %.3g)\n", ra.name.c_str(), diff, scale);
    }
    if (std::isnan(diff) || diff > worst) {
      worst = std::isnan(diff) ? INFINITY : diff;
      worst_name = ra.name;
    }
  }
  for (const auto& [name, r] : in_b) problems.push_back(name + " is only in B");
  std::printf("%d tensor(s), %lld value(s) compared: %d differ; largest difference %.3g%s%s (tolerance %.3g)\n",
              compared, static_cast<long long>(elements), differing, worst, worst_name.empty() ? "" : " in ",
              worst_name.c_str(), d.tolerance);
  if (compared == 0 && problems.empty()) return Status::NotFound("no tensors to compare");
  if (!problems.empty()) {
    std::string msg = "the checkpoints do not hold the same tensors:";
    for (size_t i = 0; i < problems.size() && i < 10; ++i) msg += "\n  " + problems[i];
    if (problems.size() > 10) msg += "\n  (" + std::to_string(problems.size() - 10) + " more)";
    return Status::FailedPrecondition(msg);
  }
  if (worst > d.tolerance) {
    return Status::FailedPrecondition("the checkpoints differ by " + std::to_string(worst) + " in " + worst_name +
                                      ", more than the tolerance " + std::to_string(d.tolerance));
  }
  std::printf("equal within the tolerance\n");
  return Status::OK();
}

void Add(CLI::App* parent, const char* name, const char* help, bool with_out, Status (*fn)(const CkptArgs&),
         int* exit_code) {
  auto args = std::make_shared<CkptArgs>();
  CLI::App* cmd = parent->add_subcommand(name, help);
  cmd->add_option("PATH", args->path, "run directory (uses its store/) or a store directory")->required();
  if (fn != &List) cmd->add_option("--step", args->step, "checkpoint step (default: the latest)");
  if (with_out) cmd->add_option("--out", args->out, "output file (the model, as model.pt)")->required();
  const std::string label = std::string("dtrain ckpt ") + name;
  cmd->callback([args, fn, exit_code, label] {
    Status st = fn(*args);
    if (!st.ok()) {
      std::fprintf(stderr, "%s: %s\n", label.c_str(), st.ToString().c_str());
      *exit_code = 1;
    }
  });
}

}  // namespace

void AddCkptCommands(CLI::App& app, int* exit_code) {
  CLI::App* ckpt = app.add_subcommand("ckpt", "list, inspect and export checkpoints");
  ckpt->require_subcommand(1);
  Add(ckpt, "list", "list the checkpoints of a run or store, newest first", false, &List, exit_code);
  Add(ckpt, "inspect", "print a checkpoint's manifest and sizes and verify every checksum", false, &Inspect,
      exit_code);
  Add(ckpt, "export", "write a checkpoint's model alone (for dtrain eval --model and the indexer)", true, &Export,
      exit_code);
  auto diff = std::make_shared<DiffArgs>();
  CLI::App* cmd = ckpt->add_subcommand(
      "diff", "compare two checkpoints' model (and loss) tensors: of two runs, e.g. a pipeline and a sync run of "
              "the same job, or two steps of one");
  cmd->add_option("A", diff->a, "run directory or store directory")->required();
  cmd->add_option("B", diff->b, "run directory or store directory")->required();
  cmd->add_option("--step-a", diff->step_a, "A's checkpoint step (default: the newest intact one)");
  cmd->add_option("--step-b", diff->step_b, "B's checkpoint step (default: the newest intact one)");
  cmd->add_option("--tolerance", diff->tolerance, "largest absolute difference accepted")->capture_default_str();
  cmd->add_flag("--all", diff->all, "compare every tensor (optimizer state too), not only model/ and loss/");
  cmd->callback([diff, exit_code] {
    Status st = Diff(*diff);
    if (!st.ok()) {
      std::fprintf(stderr, "dtrain ckpt diff: %s\n", st.ToString().c_str());
      *exit_code = 1;
    }
  });
}

}  // namespace dtrain::cli
