#include "dtrain/models/registry.h"

#include <exception>
#include <functional>
#include <utility>

#include "dtrain/job.pb.h"
#include "dtrain/models/margin_heads.h"
#include "dtrain/models/triplet.h"

namespace dtrain::models {
namespace {

constexpr char kResnetEmbedder[] = "resnet_embedder";
constexpr char kArcFace[] = "arcface";
constexpr char kCosFace[] = "cosface";
constexpr char kTriplet[] = "triplet";

std::string Join(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) {
    if (!out.empty()) out += ", ";
    out += n;
  }
  return out;
}

// Runs `build`, turning LibTorch exceptions into Status.
Status Guarded(const std::string& what, const std::function<void()>& build) {
  try {
    build();
  } catch (const c10::Error& e) {
    return Status::Internal(what + ": " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return Status::Internal(what + ": " + e.what());
  }
  return Status::OK();
}

Status ToMarginOptions(MarginKind kind, const MarginConfig& config, const std::string& field, int64_t embedding_dim,
                       int64_t num_classes, MarginSoftmaxOptions* out) {
  MarginSoftmaxOptions o;
  o.kind = kind;
  o.num_classes = num_classes;
  o.embedding_dim = embedding_dim;
  o.scale = config.scale();
  o.margin = config.margin();
  o.easy_margin = config.easy_margin();
  DTRAIN_RETURN_IF_ERROR(o.Validate(field));
  *out = o;
  return Status::OK();
}

Status ToTripletOptions(const TripletConfig& config, TripletOptions* out) {
  TripletOptions o;
  o.margin = config.margin();
  switch (config.distance()) {
    case TripletConfig::L2:
      o.distance = TripletDistance::kL2;
      break;
    case TripletConfig::COSINE:
      o.distance = TripletDistance::kCosine;
      break;
    default:
      return Status::InvalidArgument("loss.triplet.distance: unknown value " + std::to_string(config.distance()));
  }
  switch (config.miner()) {
    case TripletConfig::BATCH_ALL:
      o.miner = TripletMiner::kBatchAll;
      break;
    case TripletConfig::BATCH_HARD:
      o.miner = TripletMiner::kBatchHard;
      break;
    case TripletConfig::SEMI_HARD:
      o.miner = TripletMiner::kSemiHard;
      break;
    default:
      return Status::InvalidArgument("loss.triplet.miner: unknown value " + std::to_string(config.miner()));
  }
  DTRAIN_RETURN_IF_ERROR(o.Validate());
  *out = o;
  return Status::OK();
}

}  // namespace

std::vector<std::string> ModelNames() { return {kResnetEmbedder}; }

std::vector<std::string> LossNames() { return {kArcFace, kCosFace, kTriplet}; }

Status ToEmbedderOptions(const ModelConfig& config, EmbedderOptions* out) {
  EmbedderOptions o;
  if (config.widths_size() > 0) o.widths.assign(config.widths().begin(), config.widths().end());
  o.blocks_per_stage = config.blocks_per_stage();
  o.embedding_dim = config.embedding_dim();
  o.dropout = config.dropout();
  DTRAIN_RETURN_IF_ERROR(o.Validate());
  *out = std::move(o);
  return Status::OK();
}

Status BuildEmbedder(const ModelConfig& config, Embedder* out) {
  if (config.name() != kResnetEmbedder) {
    return Status::InvalidArgument("model.name: unknown model '" + config.name() + "' (known: " + Join(ModelNames()) +
                                   ")");
  }
  EmbedderOptions options;
  DTRAIN_RETURN_IF_ERROR(ToEmbedderOptions(config, &options));
  Embedder model{nullptr};
  DTRAIN_RETURN_IF_ERROR(Guarded("building model '" + config.name() + "'", [&] { model = Embedder(options); }));
  *out = std::move(model);
  return Status::OK();
}

Status BuildLoss(const LossConfig& config, int64_t embedding_dim, int64_t num_classes,
                 std::shared_ptr<LossModuleImpl>* out) {
  const std::string& name = config.name();
  std::shared_ptr<LossModuleImpl> loss;
  if (name == kArcFace || name == kCosFace) {
    const bool arc = name == kArcFace;
    MarginSoftmaxOptions options;
    DTRAIN_RETURN_IF_ERROR(ToMarginOptions(arc ? MarginKind::kArcFace : MarginKind::kCosFace,
                                           arc ? config.arcface() : config.cosface(), "loss." + name, embedding_dim,
                                           num_classes, &options));
    DTRAIN_RETURN_IF_ERROR(
        Guarded("building loss '" + name + "'", [&] { loss = std::make_shared<MarginSoftmaxImpl>(options); }));
  } else if (name == kTriplet) {
    TripletOptions options;
    DTRAIN_RETURN_IF_ERROR(ToTripletOptions(config.triplet(), &options));
    DTRAIN_RETURN_IF_ERROR(
        Guarded("building loss '" + name + "'", [&] { loss = std::make_shared<TripletLossImpl>(options); }));
  } else {
    return Status::InvalidArgument("loss.name: unknown loss '" + name + "' (known: " + Join(LossNames()) + ")");
  }
  *out = std::move(loss);
  return Status::OK();
}

}  // namespace dtrain::models
