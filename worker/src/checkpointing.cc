#include "dtrain/worker/checkpointing.h"

#include <spdlog/spdlog.h>

#include <cstring>
#include <filesystem>
#include <map>

#include "dtrain/common/crc32c.h"

namespace dtrain::worker {
namespace {

Status ToDType(torch::ScalarType t, DType* out) {
  switch (t) {
    case torch::kFloat32: *out = DType::kFloat32; return Status::OK();
    case torch::kFloat64: *out = DType::kFloat64; return Status::OK();
    case torch::kFloat16: *out = DType::kFloat16; return Status::OK();
    case torch::kBFloat16: *out = DType::kBFloat16; return Status::OK();
    case torch::kInt64: *out = DType::kInt64; return Status::OK();
    case torch::kInt32: *out = DType::kInt32; return Status::OK();
    case torch::kUInt8: *out = DType::kUInt8; return Status::OK();
    case torch::kBool: *out = DType::kBool; return Status::OK();
    default: break;
  }
  return Status::InvalidArgument(std::string("no checkpoint dtype for ") + c10::toString(t));
}

torch::ScalarType FromDType(DType d) {
  switch (d) {
    case DType::kFloat32: return torch::kFloat32;
    case DType::kFloat64: return torch::kFloat64;
    case DType::kFloat16: return torch::kFloat16;
    case DType::kBFloat16: return torch::kBFloat16;
    case DType::kInt64: return torch::kInt64;
    case DType::kInt32: return torch::kInt32;
    case DType::kUInt8: return torch::kUInt8;
    case DType::kBool: return torch::kBool;
  }
  return torch::kFloat32;
}

std::string Shape(torch::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Every trainable parameter of the model and the loss under its checkpoint
// name ("model/..." or "loss/..."), and the model's buffers.
struct NamedState {
  std::vector<std::pair<std::string, torch::Tensor>> parameters;
  std::vector<std::pair<std::string, torch::Tensor>> buffers;
};

NamedState Collect(const TrainingObjects& o) {
  NamedState s;
  for (const auto& p : o.model->named_parameters()) s.parameters.emplace_back("model/" + p.key(), p.value());
  if (o.loss) {
    for (const auto& p : o.loss->named_parameters()) s.parameters.emplace_back("loss/" + p.key(), p.value());
  }
  for (const auto& b : o.model->named_buffers()) s.buffers.emplace_back("model/" + b.key(), b.value());
  if (o.loss) {
    for (const auto& b : o.loss->named_buffers()) s.buffers.emplace_back("loss/" + b.key(), b.value());
  }
  return s;
}

const char* OptimizerName(OptimizerConfig::Kind k) { return k == OptimizerConfig::ADAMW ? "ADAMW" : "SGD"; }

}  // namespace

Status TensorToRecord(const std::string& name, const torch::Tensor& tensor, TensorRecord* out) {
  DType dtype = DType::kFloat32;  // set by ToDType on success
  DTRAIN_RETURN_IF_ERROR(ToDType(tensor.scalar_type(), &dtype).WithContext("tensor '" + name + "'"));
  const torch::Tensor t = tensor.detach().to(torch::kCPU).contiguous();
  out->name = name;
  out->dtype = dtype;
  out->shape.assign(t.sizes().begin(), t.sizes().end());
  out->bytes.assign(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
  return Status::OK();
}

Status RecordToTensor(const TensorRecord& record, torch::Tensor* out) {
  torch::Tensor t = torch::empty(record.shape, FromDType(record.dtype));
  const size_t bytes = static_cast<size_t>(t.numel() * t.element_size());
  if (bytes != record.bytes.size()) {
    return Status::Corruption("tensor '" + record.name + "' holds " + std::to_string(record.bytes.size()) +
                              " bytes, its shape " + Shape(t.sizes()) + " needs " + std::to_string(bytes));
  }
  std::memcpy(t.data_ptr(), record.bytes.data(), bytes);
  *out = t;
  return Status::OK();
}

std::string ResumeDigest(const JobConfig& config) {
  // An embedder's digest leaves out model.detector (filled with defaults by
  // the config loader since the detector exists), so stores written before
  // it keep their digest.
  ModelConfig model = config.model();
  if (model.name() != "centernet_detector") model.clear_detector();
  std::string bytes;
  model.SerializeToString(&bytes);
  std::string loss;
  config.loss().SerializeToString(&loss);
  bytes += '\0' + loss + '\0' + config.data().dataset();
  char hex[16];
  std::snprintf(hex, sizeof hex, "%08x", crc32c::Value(bytes));
  return hex;
}

std::map<std::string, torch::Tensor> OptimizerSlots(torch::optim::Optimizer& optimizer, OptimizerConfig::Kind kind,
                                                    const torch::Tensor& param) {
  std::map<std::string, torch::Tensor> out;
  auto& state = optimizer.state();
  auto it = state.find(param.unsafeGetTensorImpl());
  if (it == state.end()) return out;  // no step taken yet
  auto add = [&](const char* slot, const torch::Tensor& t) {
    if (t.defined()) out[slot] = t;
  };
  if (kind == OptimizerConfig::ADAMW) {
    auto& st = static_cast<torch::optim::AdamWParamState&>(*it->second);
    add("exp_avg", st.exp_avg());
    add("exp_avg_sq", st.exp_avg_sq());
    add("max_exp_avg_sq", st.max_exp_avg_sq());
    out["step"] = torch::tensor(st.step(), torch::kInt64);
  } else {
    add("momentum_buffer", static_cast<torch::optim::SGDParamState&>(*it->second).momentum_buffer());
  }
  return out;
}

void SetOptimizerSlots(torch::optim::Optimizer& optimizer, OptimizerConfig::Kind kind, const torch::Tensor& param,
                       const std::map<std::string, torch::Tensor>& slots) {
  auto& state = optimizer.state();
  void* key = param.unsafeGetTensorImpl();
  state.erase(key);
  auto get = [&](const char* slot) {
    auto it = slots.find(slot);
    return it == slots.end() ? torch::Tensor() : it->second;
  };
  if (kind == OptimizerConfig::ADAMW) {
    if (slots.empty()) return;
    auto st = std::make_unique<torch::optim::AdamWParamState>();
    if (torch::Tensor t = get("exp_avg"); t.defined()) st->exp_avg(t);
    if (torch::Tensor t = get("exp_avg_sq"); t.defined()) st->exp_avg_sq(t);
    if (torch::Tensor t = get("max_exp_avg_sq"); t.defined()) st->max_exp_avg_sq(t);
    if (torch::Tensor t = get("step"); t.defined()) st->step(t.item<int64_t>());
    state[key] = std::move(st);
  } else if (torch::Tensor t = get("momentum_buffer"); t.defined()) {
    auto st = std::make_unique<torch::optim::SGDParamState>();
    st->momentum_buffer(t);
    state[key] = std::move(st);
  }
}

Status CaptureCheckpoint(const JobConfig& config, const char* mode, int world_size, const TrainingObjects& o,
                         const TrainerState& state, CheckpointData* out) {
  torch::NoGradGuard no_grad;
  out->job_name = config.name();
  out->config_digest = ResumeDigest(config);
  out->step = state.step();
  out->epoch = static_cast<int64_t>(state.sampler_epoch());
  out->mode = mode;
  out->world_size = world_size;
  out->tensors.clear();
  out->sections.clear();
  const NamedState named = Collect(o);
  for (const auto& [name, p] : named.parameters) {
    TensorRecord r;
    DTRAIN_RETURN_IF_ERROR(TensorToRecord(name, p, &r));
    out->tensors.push_back(std::move(r));
    for (const auto& [slot, t] : OptimizerSlots(*o.optimizer, o.optimizer_kind, p)) {
      TensorRecord s;
      DTRAIN_RETURN_IF_ERROR(TensorToRecord("optim/" + name + "/" + slot, t, &s));
      out->tensors.push_back(std::move(s));
    }
  }
  for (const auto& [name, b] : named.buffers) {
    TensorRecord r;
    DTRAIN_RETURN_IF_ERROR(TensorToRecord(name, b, &r));
    out->tensors.push_back(std::move(r));
  }
  TrainerState s = state;
  s.set_optimizer(OptimizerName(o.optimizer_kind));
  s.set_world_size(world_size);
  s.SerializeToString(&out->sections["trainer"]);
  return Status::OK();
}

Status RestoreCheckpoint(const CheckpointData& data, const TrainingObjects& o, TrainerState* state) {
  std::map<std::string, const TensorRecord*> by_name;
  for (const TensorRecord& r : data.tensors) by_name[r.name] = &r;
  const std::string where = "checkpoint " + std::to_string(data.step);

  auto it = data.sections.find("trainer");
  if (it == data.sections.end()) return Status::Corruption(where + " has no trainer section");
  TrainerState ts;
  if (!ts.ParseFromString(it->second)) return Status::Corruption(where + ": the trainer section does not parse");
  const bool same_optimizer = ts.optimizer() == OptimizerName(o.optimizer_kind);

  // 1. Read and check everything; change nothing yet.
  std::vector<std::pair<torch::Tensor, torch::Tensor>> copies;  // (target, value)
  auto take = [&](const std::string& name, const torch::Tensor& target) -> Status {
    auto f = by_name.find(name);
    if (f == by_name.end()) {
      return Status::InvalidArgument(where + " has no tensor '" + name + "': it was saved from another model");
    }
    torch::Tensor value;
    DTRAIN_RETURN_IF_ERROR(RecordToTensor(*f->second, &value).WithContext(where));
    if (!value.sizes().equals(target.sizes()) || value.scalar_type() != target.scalar_type()) {
      return Status::InvalidArgument(where + ": tensor '" + name + "' is " + Shape(value.sizes()) + " " +
                                     c10::toString(value.scalar_type()) + ", the model needs " +
                                     Shape(target.sizes()) + " " + c10::toString(target.scalar_type()));
    }
    copies.emplace_back(target, value);
    return Status::OK();
  };
  const NamedState named = Collect(o);
  for (const auto& [name, p] : named.parameters) DTRAIN_RETURN_IF_ERROR(take(name, p));
  for (const auto& [name, b] : named.buffers) DTRAIN_RETURN_IF_ERROR(take(name, b));

  // Optimizer state: per parameter, when saved with the same optimizer kind.
  struct OptState {
    torch::Tensor param;
    std::map<std::string, torch::Tensor> slots;
  };
  std::vector<OptState> opt_states;
  if (same_optimizer) {
    for (const auto& [name, p] : named.parameters) {
      OptState os{p, {}};
      const std::string prefix = "optim/" + name + "/";
      for (auto f = by_name.lower_bound(prefix); f != by_name.end() && f->first.rfind(prefix, 0) == 0; ++f) {
        torch::Tensor v;
        DTRAIN_RETURN_IF_ERROR(RecordToTensor(*f->second, &v).WithContext(where));
        const std::string slot = f->first.substr(prefix.size());
        if (slot != "step" && !v.sizes().equals(p.sizes())) {
          return Status::InvalidArgument(where + ": optimizer tensor '" + f->first + "' is " + Shape(v.sizes()) +
                                         ", its parameter is " + Shape(p.sizes()));
        }
        os.slots[slot] = v;
      }
      if (!os.slots.empty()) opt_states.push_back(std::move(os));
    }
  }

  // 2. Apply.
  torch::NoGradGuard no_grad;
  for (auto& [target, value] : copies) target.copy_(value);
  o.optimizer->state().clear();
  for (OptState& os : opt_states) SetOptimizerSlots(*o.optimizer, o.optimizer_kind, os.param, os.slots);
  *state = ts;
  return Status::OK();
}

Status ResumeFromStore(const StoreOptions& store_options, const TrainingObjects& objects, data::Sampler* sampler,
                       int data_world_size, int64_t steps_per_epoch, TrainerState* state, bool* resumed) {
  *resumed = false;
  const std::string& dir = store_options.path;
  std::error_code ec;
  if (!std::filesystem::exists(dir, ec)) {
    spdlog::info("no checkpoint store at {}: starting {} from scratch", dir, store_options.job_name);
    return Status::OK();
  }
  StoreOptions ro = store_options;
  ro.read_only = true;
  ro.create_if_missing = false;
  std::unique_ptr<CheckpointStore> store;
  DTRAIN_RETURN_IF_ERROR(CheckpointStore::Open(ro, &store).WithContext("checkpoint store " + dir));
  int64_t latest = 0;
  Status has = store->LatestStep(&latest);
  if (has.code() == Status::Code::kNotFound) {
    spdlog::info("no checkpoint in {}: starting {} from scratch", dir, store_options.job_name);
    return Status::OK();
  }
  DTRAIN_RETURN_IF_ERROR(has);
  CheckpointData data;
  std::vector<std::string> warnings;
  DTRAIN_RETURN_IF_ERROR(store->LoadLatestGood(&data, &warnings));
  for (const std::string& w : warnings) spdlog::warn("{}", w);
  TrainerState st;
  DTRAIN_RETURN_IF_ERROR(RestoreCheckpoint(data, objects, &st));
  DTRAIN_RETURN_IF_ERROR(sampler->Restore({st.sampler_epoch(), st.sampler_position()}));
  if (data.world_size != data_world_size && steps_per_epoch > 0) {
    const int64_t g = sampler->global_batch();
    const int64_t rescaled = static_cast<int64_t>(st.sampler_epoch()) * steps_per_epoch +
                             (static_cast<int64_t>(st.sampler_position()) + g - 1) / g;
    spdlog::info("world size {} -> {}: step {} of the checkpoint is step {} at this world size", data.world_size,
                 data_world_size, st.step(), rescaled);
    st.set_step(rescaled);
  }
  spdlog::info("resuming {} from checkpoint {} (epoch {}, sample {} of it, saved in {} mode by {} worker(s))",
               store_options.job_name, data.step, st.sampler_epoch(), st.sampler_position(), data.mode,
               data.world_size);
  *state = st;
  *resumed = true;
  return Status::OK();
}

}  // namespace dtrain::worker
