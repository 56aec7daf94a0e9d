// dtrain ckpt list|inspect|export: look into a checkpoint store (read-only,
// so it works while a job is writing the store).
#include <torch/torch.h>

#include <cstdio>
#include <ctime>
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
}

}  // namespace dtrain::cli
