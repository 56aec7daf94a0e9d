#include "dtrain/paramserver/optimizer.h"

#include <cmath>

namespace dtrain::paramserver {

Status ServerOptimizer::Create(const OptimizerConfig& c, ServerOptimizer* out) {
  auto bad = [](const std::string& field, double v, const char* rule) {
    return Status::InvalidArgument("optimizer." + field + ": " + rule + ", got " + std::to_string(v));
  };
  if (c.lr() < 0) return bad("lr", c.lr(), "must be >= 0");
  if (c.weight_decay() < 0) return bad("weight_decay", c.weight_decay(), "must be >= 0");
  if (c.kind() == OptimizerConfig::SGD) {
    if (c.momentum() < 0) return bad("momentum", c.momentum(), "must be >= 0");
    if (c.nesterov() && c.momentum() <= 0) return bad("momentum", c.momentum(), "Nesterov needs momentum > 0");
  } else {
    if (c.beta1() < 0 || c.beta1() >= 1) return bad("beta1", c.beta1(), "must be in [0, 1)");
    if (c.beta2() < 0 || c.beta2() >= 1) return bad("beta2", c.beta2(), "must be in [0, 1)");
    if (c.eps() <= 0) return bad("eps", c.eps(), "must be > 0");
  }
  out->config_ = c;
  return Status::OK();
}

std::vector<std::string> ServerOptimizer::SlotNames() const {
  if (config_.kind() == OptimizerConfig::ADAMW) return {"exp_avg", "exp_avg_sq", "step"};
  if (config_.momentum() > 0) return {"momentum_buffer"};
  return {};
}

void ServerOptimizer::Apply(float* p, const float* g, int64_t n, double lr, SlotState* s) const {
  const float flr = static_cast<float>(lr);
  const float wd = config_.weight_decay();
  ++s->step;
  if (config_.kind() == OptimizerConfig::ADAMW) {
    // torch::optim::AdamW: decoupled decay, then the moments, bias-corrected.
    const float b1 = config_.beta1(), b2 = config_.beta2(), eps = config_.eps();
    if (s->exp_avg.empty()) {
      s->exp_avg.assign(static_cast<size_t>(n), 0.f);
      s->exp_avg_sq.assign(static_cast<size_t>(n), 0.f);
    }
    const double bc1 = 1.0 - std::pow(static_cast<double>(b1), static_cast<double>(s->step));
    const double bc2 = 1.0 - std::pow(static_cast<double>(b2), static_cast<double>(s->step));
    const float step_size = static_cast<float>(lr / bc1);
    const float sqrt_bc2 = static_cast<float>(std::sqrt(bc2));
    const float decay = 1.0f - flr * wd;
    float* m = s->exp_avg.data();
    float* v = s->exp_avg_sq.data();
    for (int64_t i = 0; i < n; ++i) {
      p[i] *= decay;
      m[i] = m[i] * b1 + g[i] * (1.0f - b1);
      v[i] = v[i] * b2 + g[i] * g[i] * (1.0f - b2);
      const float denom = std::sqrt(v[i]) / sqrt_bc2 + eps;
      p[i] -= step_size * (m[i] / denom);
    }
    return;
  }
  // torch::optim::SGD: d = g + wd * p; buf = d (first step) or
  // momentum * buf + d; d = d + momentum * buf (Nesterov) or buf.
  const float mom = config_.momentum();
  const bool nesterov = config_.nesterov();
  const bool first = mom > 0 && s->momentum_buffer.empty();
  if (first) s->momentum_buffer.assign(static_cast<size_t>(n), 0.f);
  float* buf = s->momentum_buffer.data();
  for (int64_t i = 0; i < n; ++i) {
    float d = wd != 0 ? g[i] + wd * p[i] : g[i];
    if (mom > 0) {
      buf[i] = first ? d : buf[i] * mom + d;
      d = nesterov ? d + mom * buf[i] : buf[i];
    }
    p[i] -= flr * d;
  }
}

}  // namespace dtrain::paramserver
