#include "dtrain/common/config.h"

#include "dtrain/common/metrics_log.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

namespace dtrain {
namespace {

namespace pb = google::protobuf;
namespace fs = std::filesystem;

// ---- parsing ------------------------------------------------------------------

// Collects protobuf parser errors as "source:line:col: message".
class CollectingErrors : public pb::io::ErrorCollector {
 public:
  explicit CollectingErrors(std::string source) : source_(std::move(source)) {}
  void AddError(int line, pb::io::ColumnNumber column, const std::string& message) override {
    Add(line, column, message);
  }
  void AddWarning(int line, pb::io::ColumnNumber column, const std::string& message) override {}
  const std::vector<std::string>& errors() const { return errors_; }

 private:
  void Add(int line, int column, const std::string& message) {
    std::ostringstream os;
    os << source_;
    if (line >= 0) os << ":" << line + 1 << ":" << column + 1;
    os << ": " << message;
    errors_.push_back(os.str());
  }
  std::string source_;
  std::vector<std::string> errors_;
};

std::string Join(const std::vector<std::string>& lines, const char* sep) {
  std::string out;
  for (size_t i = 0; i < lines.size(); ++i) {
    if (i) out += sep;
    out += lines[i];
  }
  return out;
}

std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::string cur;
  for (char c : s) {
    if (c == sep) {
      parts.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  parts.push_back(cur);
  return parts;
}

std::string Trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\n\r");
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(" \t\n\r");
  return s.substr(b, e - b + 1);
}

std::string FieldList(const pb::Descriptor* d) {
  std::vector<std::string> names;
  for (int i = 0; i < d->field_count(); ++i) names.push_back(d->field(i)->name());
  return Join(names, ", ");
}

const char* TypeName(const pb::FieldDescriptor* f) {
  if (f->type() == pb::FieldDescriptor::TYPE_ENUM) return "enum";
  return f->type_name();
}

std::string EnumValues(const pb::FieldDescriptor* f) {
  std::vector<std::string> names;
  const pb::EnumDescriptor* e = f->enum_type();
  for (int i = 0; i < e->value_count(); ++i) names.push_back(e->value(i)->name());
  return Join(names, ", ");
}

// Parses one scalar value (not a message) for `field` and stores it: sets a
// singular field, appends to a repeated one.
Status SetScalar(const std::string& raw, const pb::FieldDescriptor* field, pb::Message* msg,
                 const std::string& path) {
  std::string value = Trim(raw);
  const pb::Reflection* refl = msg->GetReflection();
  if (field->type() == pb::FieldDescriptor::TYPE_STRING && (value.empty() || value[0] != '"')) {
    // Unquoted strings are taken literally.
    if (field->is_repeated()) {
      refl->AddString(msg, field, value);
    } else {
      refl->SetString(msg, field, value);
    }
    return Status::OK();
  }
  if (pb::TextFormat::ParseFieldValueFromString(value, field, msg)) return Status::OK();
  if (field->type() == pb::FieldDescriptor::TYPE_ENUM) {
    // Accept enum names in any case: "gpipe" for GPIPE.
    std::string upper = value;
    for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    if (upper != value && pb::TextFormat::ParseFieldValueFromString(upper, field, msg)) return Status::OK();
    return Status::InvalidArgument(path + ": '" + value + "' is not one of " + EnumValues(field));
  }
  return Status::InvalidArgument(path + ": cannot parse '" + value + "' as " + TypeName(field));
}

// ---- defaults -------------------------------------------------------------------

void FillMessageDefaults(pb::Message* msg) {
  const pb::Descriptor* d = msg->GetDescriptor();
  const pb::Reflection* r = msg->GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const pb::FieldDescriptor* f = d->field(i);
    if (f->is_repeated()) continue;
    if (f->containing_oneof() && !r->HasField(*msg, f)) continue;
    if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      FillMessageDefaults(r->MutableMessage(msg, f));
      continue;
    }
    if (r->HasField(*msg, f)) continue;
    // Fields without an explicit default whose emptiness means "derived"
    // (run_dir, checkpoint.dir, hostfile) stay unset here.
    if (!f->has_default_value() && f->cpp_type() == pb::FieldDescriptor::CPPTYPE_STRING) continue;
    switch (f->cpp_type()) {
      case pb::FieldDescriptor::CPPTYPE_INT32: r->SetInt32(msg, f, f->default_value_int32()); break;
      case pb::FieldDescriptor::CPPTYPE_INT64: r->SetInt64(msg, f, f->default_value_int64()); break;
      case pb::FieldDescriptor::CPPTYPE_UINT32: r->SetUInt32(msg, f, f->default_value_uint32()); break;
      case pb::FieldDescriptor::CPPTYPE_UINT64: r->SetUInt64(msg, f, f->default_value_uint64()); break;
      case pb::FieldDescriptor::CPPTYPE_FLOAT: r->SetFloat(msg, f, f->default_value_float()); break;
      case pb::FieldDescriptor::CPPTYPE_DOUBLE: r->SetDouble(msg, f, f->default_value_double()); break;
      case pb::FieldDescriptor::CPPTYPE_BOOL: r->SetBool(msg, f, f->default_value_bool()); break;
      case pb::FieldDescriptor::CPPTYPE_ENUM: r->SetEnum(msg, f, f->default_value_enum()); break;
      case pb::FieldDescriptor::CPPTYPE_STRING: r->SetString(msg, f, f->default_value_string()); break;
      case pb::FieldDescriptor::CPPTYPE_MESSAGE: break;
    }
  }
}

// ---- validation ------------------------------------------------------------------

struct Problem {
  std::string path;     // e.g. "parallelism.async.max_staleness"
  std::string message;  // e.g. "must be >= 0, got -1"
};

template <typename T>
std::string Str(T v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

class Validator {
 public:
  explicit Validator(const JobConfig& c) : c_(c) {}

  std::vector<Problem> Run() {
    Top();
    Model();
    Loss();
    Data();
    Optimizer();
    Schedule();
    Training();
    Parallelism();
    Launch();
    Checkpoint();
    Eval();
    Index();
    return problems_;
  }

 private:
  void Fail(const std::string& path, const std::string& msg) { problems_.push_back({path, msg}); }

  template <typename T>
  void AtLeast(const std::string& path, T v, T lo) {
    if (!(v >= lo)) Fail(path, "must be >= " + Str(lo) + ", got " + Str(v));
  }
  template <typename T>
  void Greater(const std::string& path, T v, T lo) {
    if (!(v > lo)) Fail(path, "must be > " + Str(lo) + ", got " + Str(v));
  }
  template <typename T>
  void InRange(const std::string& path, T v, T lo, T hi) {  // [lo, hi]
    if (!(v >= lo && v <= hi)) Fail(path, "must be in [" + Str(lo) + ", " + Str(hi) + "], got " + Str(v));
  }
  void Finite(const std::string& path, float v) {
    if (!std::isfinite(v)) Fail(path, "must be a finite number, got " + Str(v));
  }

  void Top() {
    if (c_.name().empty()) {
      Fail("name", "is required (it names the run directory)");
    } else {
      for (char ch : c_.name()) {
        if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '_' || ch == '-' || ch == '.')) {
          Fail("name", "may hold only letters, digits, '_', '-' and '.', got '" + c_.name() + "'");
          break;
        }
      }
      if (c_.name() == "." || c_.name() == "..") Fail("name", "must not be '.' or '..'");
    }
  }

  void Model() {
    const ModelConfig& m = c_.model();
    InRange("model.embedding_dim", m.embedding_dim(), 2, 4096);
    if (m.widths_size() < 1 || m.widths_size() > 6) {
      Fail("model.widths", "needs 1 to 6 stages, got " + Str(m.widths_size()));
    }
    for (int i = 0; i < m.widths_size(); ++i) {
      InRange("model.widths[" + Str(i) + "]", m.widths(i), 1, 4096);
    }
    InRange("model.blocks_per_stage", m.blocks_per_stage(), 1, 16);
    if (!(m.dropout() >= 0 && m.dropout() < 1)) Fail("model.dropout", "must be in [0, 1), got " + Str(m.dropout()));
    // Unknown names are the model registry's to report (models/registry.h).
    const bool detector = m.name() == "centernet_detector";
    const DetectorConfig& d = m.detector();
    if (d.widths_size() != 0 && (d.widths_size() < 2 || d.widths_size() > 6)) {
      Fail("model.detector.widths", "needs 2 to 6 widths, got " + Str(d.widths_size()));
    }
    for (int i = 0; i < d.widths_size(); ++i) InRange("model.detector.widths[" + Str(i) + "]", d.widths(i), 1, 1024);
    InRange("model.detector.head_width", d.head_width(), 1, 1024);
    InRange("model.detector.max_detections", d.max_detections(), 1, 1000);
    InRange("model.detector.score_threshold", d.score_threshold(), 0.0f, 1.0f);
    AtLeast("model.detector.size_weight", d.size_weight(), 0.0f);
    AtLeast("model.detector.offset_weight", d.offset_weight(), 0.0f);
    for (int i = 0; i < d.categories_size(); ++i) {
      if (d.categories(i).empty()) Fail("model.detector.categories[" + Str(i) + "]", "must not be empty");
      for (int j = 0; j < i; ++j) {
        if (d.categories(j) == d.categories(i)) {
          Fail("model.detector.categories[" + Str(i) + "]", "repeats '" + d.categories(i) + "'");
        }
      }
    }
    const bool snaps = c_.data().dataset() == "fashion_mnist_snaps";
    if (detector && !snaps) {
      Fail("data.dataset", "the detector trains on street snaps: set dataset: \"fashion_mnist_snaps\", got '" +
                               c_.data().dataset() + "'");
    }
    if (!detector && snaps) Fail("model.name", "dataset fashion_mnist_snaps trains the detector: set name: \"centernet_detector\"");
    if (detector && c_.data().classes_size() > 0) {
      Fail("data.classes", "keeps classes for an embedder; the detector learns every item of its snaps (their "
                           "categories come from model.detector.categories)");
    }
    if (detector && c_.parallelism().mode_case() != ParallelismConfig::kSync) {
      Fail("parallelism", std::string("the detector trains with parallelism.sync (one worker or all-reduce), got ") +
                              ParallelismModeName(c_));
    }
  }

  void Margin(const std::string& path, const MarginConfig& mc, float max_margin) {
    Greater(path + ".scale", mc.scale(), 0.0f);
    Finite(path + ".scale", mc.scale());
    InRange(path + ".margin", mc.margin(), 0.0f, max_margin);
  }

  void Loss() {
    const LossConfig& l = c_.loss();
    Margin("loss.arcface", l.arcface(), 1.5707f);  // m in [0, pi/2)
    Margin("loss.cosface", l.cosface(), 1.0f);
    Greater("loss.triplet.margin", l.triplet().margin(), 0.0f);
    Finite("loss.triplet.margin", l.triplet().margin());
    if (l.name() == "triplet" && c_.data().sampler() != DataConfig::PK) {
      Fail("data.sampler", "loss.name \"triplet\" needs sampler: PK (every anchor needs positives in its batch)");
    }
    if (l.triplet().mining_scope() == TripletConfig::GLOBAL && c_.parallelism().mode_case() != ParallelismConfig::kSync) {
      Fail("loss.triplet.mining_scope", std::string("GLOBAL mining needs parallelism.sync, got ") + ParallelismModeName(c_));
    }
  }

  void Data() {
    const DataConfig& d = c_.data();
    if (d.dataset() != "fashion_mnist" && d.dataset() != "fashion_mnist_snaps") {
      Fail("data.dataset", "unknown dataset '" + d.dataset() + "' (known: fashion_mnist, fashion_mnist_snaps)");
    }
    const SnapConfig& sn = d.snaps();
    InRange("data.snaps.canvas", sn.canvas(), 32, 1024);
    if (sn.canvas() % 4 != 0) Fail("data.snaps.canvas", "must be a multiple of 4 (the detector's stride), got " + Str(sn.canvas()));
    InRange("data.snaps.min_items", sn.min_items(), 1, 64);
    InRange("data.snaps.max_items", sn.max_items(), sn.min_items(), 64);
    Greater("data.snaps.min_scale", sn.min_scale(), 0.0f);
    InRange("data.snaps.max_scale", sn.max_scale(), sn.min_scale(), static_cast<float>(sn.canvas()) / 28.0f);
    InRange("data.snaps.max_overlap", sn.max_overlap(), 0.0f, 1.0f);
    AtLeast("data.snaps.train_count", sn.train_count(), int64_t{1});
    AtLeast("data.snaps.eval_count", sn.eval_count(), int64_t{1});
    if (d.dir().empty()) Fail("data.dir", "must name the dataset directory");
    InRange("data.batch_size", d.batch_size(), 1, 1 << 20);
    if (d.sampler() == DataConfig::PK) {
      InRange("data.pk_classes", d.pk_classes(), 2, 10);
      AtLeast("data.pk_images", d.pk_images(), 2);
      if (d.pk_classes() * d.pk_images() != d.batch_size()) {
        Fail("data.batch_size", "the PK sampler needs batch_size = pk_classes x pk_images = " +
                                    Str(d.pk_classes()) + " x " + Str(d.pk_images()) + " = " +
                                    Str(d.pk_classes() * d.pk_images()) + ", got " + Str(d.batch_size()));
      }
    }
    InRange("data.augment.pad", d.augment().pad(), 0, 14);
    {
      std::set<int> seen;
      for (int c : d.classes()) {
        if (c < 0 || c > 9) Fail("data.classes", "Fashion-MNIST classes are 0-9, got " + Str(c));
        if (!seen.insert(c).second) Fail("data.classes", "class " + Str(c) + " is listed twice");
      }
      if (d.sampler() == DataConfig::PK && d.classes_size() > 0 && d.pk_classes() > d.classes_size()) {
        Fail("data.pk_classes", "the PK sampler draws " + Str(d.pk_classes()) + " classes per batch but data.classes "
                                "keeps " + Str(d.classes_size()));
      }
    }
    AtLeast("data.train_limit", d.train_limit(), int64_t{0});
    AtLeast("data.test_limit", d.test_limit(), int64_t{0});
    InRange("data.loader_threads", d.loader_threads(), 0, 64);
    InRange("data.prefetch", d.prefetch(), 1, 64);
  }

  void Optimizer() {
    const OptimizerConfig& o = c_.optimizer();
    Greater("optimizer.lr", o.lr(), 0.0f);
    Finite("optimizer.lr", o.lr());
    if (!(o.momentum() >= 0 && o.momentum() < 1)) Fail("optimizer.momentum", "must be in [0, 1), got " + Str(o.momentum()));
    AtLeast("optimizer.weight_decay", o.weight_decay(), 0.0f);
    if (!(o.beta1() >= 0 && o.beta1() < 1)) Fail("optimizer.beta1", "must be in [0, 1), got " + Str(o.beta1()));
    if (!(o.beta2() >= 0 && o.beta2() < 1)) Fail("optimizer.beta2", "must be in [0, 1), got " + Str(o.beta2()));
    Greater("optimizer.eps", o.eps(), 0.0f);
    AtLeast("optimizer.grad_clip_norm", o.grad_clip_norm(), 0.0f);
    if (o.nesterov() && o.kind() == OptimizerConfig::SGD && o.momentum() == 0) {
      Fail("optimizer.nesterov", "Nesterov SGD needs momentum > 0");
    }
  }

  void Schedule() {
    const ScheduleConfig& s = c_.schedule();
    if (!(s.warmup_fraction() >= 0 && s.warmup_fraction() < 1)) {
      Fail("schedule.warmup_fraction", "must be in [0, 1), got " + Str(s.warmup_fraction()));
    }
    if (!(s.warmup_start_ratio() > 0 && s.warmup_start_ratio() <= 1)) {
      Fail("schedule.warmup_start_ratio", "must be in (0, 1], got " + Str(s.warmup_start_ratio()));
    }
    InRange("schedule.min_lr_ratio", s.min_lr_ratio(), 0.0f, 1.0f);
    if (s.kind() == ScheduleConfig::STEP) {
      if (s.milestones_size() == 0) Fail("schedule.milestones", "kind STEP needs at least one milestone (in epochs)");
      for (int i = 0; i < s.milestones_size(); ++i) {
        const std::string p = "schedule.milestones[" + Str(i) + "]";
        Greater(p, s.milestones(i), 0.0f);
        if (i > 0 && !(s.milestones(i) > s.milestones(i - 1))) Fail(p, "milestones must increase");
      }
      if (!(s.gamma() > 0 && s.gamma() <= 1)) Fail("schedule.gamma", "must be in (0, 1], got " + Str(s.gamma()));
    }
  }

  void Training() {
    const TrainingConfig& t = c_.training();
    AtLeast("training.max_steps", t.max_steps(), int64_t{0});
    if (t.max_steps() == 0) AtLeast("training.epochs", t.epochs(), 1);
    AtLeast("training.log_every_steps", t.log_every_steps(), 1);
    InRange("training.threads", t.threads(), 0, 1024);
    AtLeast("training.slow_rank", t.slow_rank(), -1);
    AtLeast("training.slow_factor", t.slow_factor(), 1.0f);
  }

  void Parallelism() {
    const ParallelismConfig& p = c_.parallelism();
    switch (p.mode_case()) {
      case ParallelismConfig::kSync: {
        const SyncConfig& s = p.sync();
        Greater("parallelism.sync.bucket_size_mb", s.bucket_size_mb(), 0.0f);
        Greater("parallelism.sync.collective_timeout_s", s.collective_timeout_s(), 0.0f);
        if (s.backend() == SyncConfig::BACKEND_NCCL && c_.device() == DEVICE_CPU) {
          Fail("parallelism.sync.backend", "NCCL works on CUDA tensors; device is CPU (use BACKEND_MPI or AUTO)");
        }
        break;
      }
      case ParallelismConfig::kAsync: {
        const AsyncConfig& a = p.async();
        InRange("parallelism.async.shards", a.shards(), 1, 256);
        AtLeast("parallelism.async.max_staleness", a.max_staleness(), 0);
        InRange("parallelism.async.server_threads", a.server_threads(), 1, 256);
        InRange("parallelism.async.max_message_mb", a.max_message_mb(), 1, 2047);
        Greater("parallelism.async.chunk_mb", a.chunk_mb(), 0.0f);
        if (a.chunk_mb() > 0 && a.chunk_mb() >= static_cast<float>(a.max_message_mb())) {
          Fail("parallelism.async.chunk_mb", "must be below max_message_mb (" + Str(a.max_message_mb()) +
                                                 "), got " + Str(a.chunk_mb()));
        }
        Greater("parallelism.async.lease_timeout_s", a.lease_timeout_s(), 0.0f);
        Greater("parallelism.async.rpc_timeout_s", a.rpc_timeout_s(), 0.0f);
        break;
      }
      case ParallelismConfig::kPipeline: {
        const PipelineConfig& pl = p.pipeline();
        InRange("parallelism.pipeline.stages", pl.stages(), 2, 64);
        InRange("parallelism.pipeline.micro_batches", pl.micro_batches(), 1, 1024);
        if (pl.micro_batches() >= 1 && c_.data().batch_size() % pl.micro_batches() != 0) {
          Fail("parallelism.pipeline.micro_batches", "must divide data.batch_size (" + Str(c_.data().batch_size()) +
                                                         "), got " + Str(pl.micro_batches()));
        }
        if (pl.layers_per_stage_size() != 0 && pl.layers_per_stage_size() != pl.stages()) {
          Fail("parallelism.pipeline.layers_per_stage", "needs one count per stage (" + Str(pl.stages()) +
                                                            "), got " + Str(pl.layers_per_stage_size()));
        }
        for (int i = 0; i < pl.layers_per_stage_size(); ++i) {
          AtLeast("parallelism.pipeline.layers_per_stage[" + Str(i) + "]", pl.layers_per_stage(i), 1);
        }
        if (pl.stages() >= 2 && c_.launch().workers() % pl.stages() != 0) {
          Fail("launch.workers", "a pipeline job needs workers = replicas x stages; " + Str(c_.launch().workers()) +
                                     " is not a multiple of parallelism.pipeline.stages (" + Str(pl.stages()) + ")");
        }
        Greater("parallelism.pipeline.timeout_s", pl.timeout_s(), 0.0f);
        break;
      }
      case ParallelismConfig::MODE_NOT_SET:
        Fail("parallelism", "one of sync, async or pipeline must be set");
        break;
    }
  }

  void Launch() {
    const LaunchConfig& l = c_.launch();
    InRange("launch.workers", l.workers(), 1, 4096);
    if (!l.hostfile().empty() && l.launcher() != LaunchConfig::MPIRUN) {
      Fail("launch.hostfile", "is only used with launcher: MPIRUN");
    }
    if (l.bind_address().empty()) Fail("launch.bind_address", "must not be empty (default 127.0.0.1)");
    InRange("launch.coordinator_port", l.coordinator_port(), 0, 65535);
    Greater("launch.heartbeat_interval_s", l.heartbeat_interval_s(), 0.0f);
    if (!(l.heartbeat_timeout_s() > l.heartbeat_interval_s())) {
      Fail("launch.heartbeat_timeout_s", "must exceed heartbeat_interval_s (" + Str(l.heartbeat_interval_s()) +
                                             "), got " + Str(l.heartbeat_timeout_s()));
    }
    Greater("launch.stall_timeout_s", l.stall_timeout_s(), 0.0f);
    AtLeast("launch.max_restarts", l.max_restarts(), 0);
    AtLeast("launch.restart_backoff_s", l.restart_backoff_s(), 0.0f);
  }

  void Checkpoint() {
    const CheckpointConfig& k = c_.checkpoint();
    AtLeast("checkpoint.every_steps", k.every_steps(), int64_t{0});
    AtLeast("checkpoint.every_epochs", k.every_epochs(), 0);
    AtLeast("checkpoint.keep_last", k.keep_last(), 1);
  }

  void Eval() {
    const EvalConfig& e = c_.eval();
    AtLeast("eval.every_epochs", e.every_epochs(), 0);
    InRange("eval.batch_size", e.batch_size(), 1, 1 << 20);
    for (int i = 0; i < e.recall_at_size(); ++i) InRange("eval.recall_at[" + Str(i) + "]", e.recall_at(i), 1, 1000);
  }

  void Index() {
    const IndexConfig& x = c_.index();
    if (x.gallery().empty()) Fail("index.gallery", "must name a gallery (fashion_mnist:train, fashion_mnist:test or a directory)");
    InRange("index.hnsw_m", x.hnsw_m(), 2, 256);
    AtLeast("index.hnsw_ef_construction", x.hnsw_ef_construction(), 1);
    AtLeast("index.hnsw_ef_search", x.hnsw_ef_search(), 1);
    AtLeast("index.ivf_nlist", x.ivf_nlist(), 1);
    if (x.ivf_nlist() >= 1) InRange("index.ivf_nprobe", x.ivf_nprobe(), 1, x.ivf_nlist());
    AtLeast("index.gallery_limit", x.gallery_limit(), int64_t{0});
    InRange("index.embed_batch_size", x.embed_batch_size(), 1, 1 << 16);
  }

  const JobConfig& c_;
  std::vector<Problem> problems_;
};

// ---- locating fields in the source ----------------------------------------------

// Splits "a.b[2].c" into {("a",-1), ("b",2), ("c",-1)}.
std::vector<std::pair<std::string, int>> PathParts(const std::string& path) {
  std::vector<std::pair<std::string, int>> out;
  for (const std::string& part : Split(path, '.')) {
    size_t br = part.find('[');
    if (br == std::string::npos) {
      out.emplace_back(part, -1);
    } else {
      out.emplace_back(part.substr(0, br), std::atoi(part.c_str() + br + 1));
    }
  }
  return out;
}

// "file:line:col" of the deepest part of `path` found in the parse tree, or
// "" when the path was not written in the file. Oneof members are reached
// through their containing message ("parallelism.async" is the field "async"
// of ParallelismConfig).
std::string Locate(const std::string& source, const pb::TextFormat::ParseInfoTree* tree, const std::string& path) {
  const pb::Descriptor* d = JobConfig::descriptor();
  const pb::TextFormat::ParseInfoTree* node = tree;
  auto parts = PathParts(path);
  for (size_t i = 0; i < parts.size() && node != nullptr && d != nullptr; ++i) {
    const pb::FieldDescriptor* f = d->FindFieldByName(parts[i].first);
    if (f == nullptr) return "";
    int index = f->is_repeated() ? std::max(parts[i].second, 0) : -1;
    if (i + 1 == parts.size()) {
      pb::TextFormat::ParseLocation loc = node->GetLocation(f, index);
      // A list written as [a, b] may record only where the list starts.
      if (loc.line < 0 && index > 0) loc = node->GetLocation(f, 0);
      if (loc.line < 0) return "";
      return source + ":" + Str(loc.line + 1) + ":" + Str(loc.column + 1);
    }
    node = node->GetTreeForNested(f, index);
    d = f->message_type();
  }
  return "";
}

Status Validate(const JobConfig& config, const std::string& source, const pb::TextFormat::ParseInfoTree* tree,
                const std::map<std::string, std::string>& overridden) {
  std::vector<Problem> problems = Validator(config).Run();
  if (problems.empty()) return Status::OK();
  std::vector<std::string> lines;
  for (const Problem& p : problems) {
    std::string where;
    // An override of the field or of a message holding it wins over the file.
    for (const auto& [opath, assignment] : overridden) {
      if (p.path == opath || p.path.rfind(opath + ".", 0) == 0 || p.path.rfind(opath + "[", 0) == 0) {
        where = "--set " + assignment;
      }
    }
    if (where.empty() && tree != nullptr) where = Locate(source, tree, p.path);
    if (where.empty()) where = source;
    lines.push_back(where + ": " + p.path + ": " + p.message);
  }
  std::string head = problems.size() == 1 ? "" : Str(problems.size()) + " problems in the job config:\n";
  return Status::InvalidArgument(head + Join(lines, "\n"));
}

Status ApplyOverrideImpl(const std::string& assignment, JobConfig* config, std::string* canonical_path) {
  const size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) {
    return Status::InvalidArgument("--set " + assignment + ": expected FIELD.PATH=VALUE");
  }
  const std::string path = Trim(assignment.substr(0, eq));
  const std::string value = assignment.substr(eq + 1);
  const std::string ctx = "--set " + assignment;
  pb::Message* msg = config;
  std::vector<std::string> parts = Split(path, '.');
  std::string walked;
  for (size_t i = 0; i < parts.size(); ++i) {
    const pb::Descriptor* d = msg->GetDescriptor();
    const pb::FieldDescriptor* f = d->FindFieldByName(parts[i]);
    std::string where = walked.empty() ? std::string("the job config") : walked;
    if (f == nullptr) {
      return Status::InvalidArgument(ctx + ": " + where + " has no field '" + parts[i] + "' (fields: " +
                                     FieldList(d) + ")");
    }
    walked += (walked.empty() ? "" : ".") + parts[i];
    const pb::Reflection* r = msg->GetReflection();
    const bool last = i + 1 == parts.size();
    if (!last) {
      if (f->cpp_type() != pb::FieldDescriptor::CPPTYPE_MESSAGE || f->is_repeated()) {
        return Status::InvalidArgument(ctx + ": " + walked + " is a " + TypeName(f) +
                                       (f->is_repeated() ? " list" : "") + ", it has no field '" + parts[i + 1] + "'");
      }
      msg = r->MutableMessage(msg, f);  // selects a oneof member
      continue;
    }
    *canonical_path = walked;
    if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      if (f->is_repeated()) return Status::InvalidArgument(ctx + ": lists of messages cannot be set with --set");
      std::string body = Trim(value);
      if (body.size() >= 2 && body.front() == '{' && body.back() == '}') body = body.substr(1, body.size() - 2);
      pb::Message* sub = r->MutableMessage(msg, f);
      sub->Clear();
      CollectingErrors errors(ctx);
      pb::TextFormat::Parser parser;
      parser.RecordErrorsTo(&errors);
      if (!parser.MergeFromString(body, sub)) {
        return Status::InvalidArgument(Join(errors.errors(), "\n"));
      }
      return Status::OK();
    }
    if (f->is_repeated()) {
      std::string list = Trim(value);
      if (list.size() >= 2 && list.front() == '[' && list.back() == ']') list = list.substr(1, list.size() - 2);
      r->ClearField(msg, f);
      if (Trim(list).empty()) return Status::OK();
      for (const std::string& item : Split(list, ',')) {
        Status st = SetScalar(item, f, msg, walked);
        if (!st.ok()) return st.WithContext(ctx);
      }
      return Status::OK();
    }
    Status st = SetScalar(value, f, msg, walked);
    if (!st.ok()) return Status::InvalidArgument(ctx + ": " + st.message());
    return Status::OK();
  }
  return Status::InvalidArgument(ctx + ": empty field path");
}

Status ParseImpl(const std::string& text, const std::string& source, const std::vector<std::string>& overrides,
                 JobConfig* out) {
  JobConfig config;
  CollectingErrors errors(source);
  pb::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  pb::TextFormat::ParseInfoTree tree;
  parser.WriteLocationsTo(&tree);
  if (!parser.ParseFromString(text, &config)) {
    std::vector<std::string> errs = errors.errors();
    if (errs.empty()) errs.push_back(source + ": cannot parse as a dtrain.JobConfig in text format");
    return Status::InvalidArgument(Join(errs, "\n"));
  }
  std::map<std::string, std::string> overridden;  // canonical path -> assignment
  for (const std::string& o : overrides) {
    std::string path;
    DTRAIN_RETURN_IF_ERROR(ApplyOverrideImpl(o, &config, &path));
    overridden[path] = o;
  }
  FillDefaults(&config);
  DTRAIN_RETURN_IF_ERROR(Validate(config, source, &tree, overridden));
  *out = std::move(config);
  return Status::OK();
}

}  // namespace

Status ApplyOverride(const std::string& assignment, JobConfig* config) {
  std::string path;
  return ApplyOverrideImpl(assignment, config, &path);
}

void FillDefaults(JobConfig* config) {
  if (config->parallelism().mode_case() == ParallelismConfig::MODE_NOT_SET) {
    config->mutable_parallelism()->mutable_sync();
  }
  FillMessageDefaults(config);
  if (config->model().widths_size() == 0) {
    for (int w : {32, 64, 128}) config->mutable_model()->add_widths(w);
  }
  if (config->eval().recall_at_size() == 0) {
    for (int k : {1, 5, 10}) config->mutable_eval()->add_recall_at(k);
  }
  if (config->run_dir().empty() && !config->name().empty()) config->set_run_dir("runs/" + config->name());
  if (config->checkpoint().dir().empty() && !config->run_dir().empty()) {
    config->mutable_checkpoint()->set_dir(config->run_dir() + "/store");
  }
  if (config->index().output_dir().empty() && !config->run_dir().empty()) {
    config->mutable_index()->set_output_dir(config->run_dir() + "/index");
  }
}

Status ValidateJobConfig(const JobConfig& config) {
  return Validate(config, "job config", nullptr, {});
}

Status ParseJobConfig(const std::string& text, const std::string& source_name,
                      const std::vector<std::string>& overrides, JobConfig* out) {
  return ParseImpl(text, source_name, overrides, out);
}

Status LoadJobConfig(const std::string& path, const std::vector<std::string>& overrides, JobConfig* out) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return Status::NotFound("config file " + path + " does not exist");
  if (fs::is_directory(path, ec)) return Status::InvalidArgument("config " + path + " is a directory, expected a .textproto file");
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError("cannot open config file " + path);
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) return Status::IOError("error reading config file " + path);
  return ParseImpl(buf.str(), path, overrides, out);
}

std::string FormatJobConfig(const JobConfig& config) {
  std::string text;
  pb::TextFormat::Printer printer;
  printer.SetUseShortRepeatedPrimitives(true);
  printer.PrintToString(config, &text);
  return text;
}

Status WriteResolvedConfig(const JobConfig& config, const std::string& path) {
  return WriteFileAtomically(path,
                             "# Resolved job config written by dtrain: every field, defaults included.\n"
                             "# proto-file: proto/dtrain/job.proto\n# proto-message: dtrain.JobConfig\n\n" +
                                 FormatJobConfig(config));
}

const char* ParallelismModeName(const JobConfig& config) {
  switch (config.parallelism().mode_case()) {
    case ParallelismConfig::kSync: return "sync";
    case ParallelismConfig::kAsync: return "async";
    case ParallelismConfig::kPipeline: return "pipeline";
    case ParallelismConfig::MODE_NOT_SET: break;
  }
  return "sync";
}

}  // namespace dtrain
