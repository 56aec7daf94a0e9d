#include "dtrain/paramserver/optimizer.h"

#include <cmath>
#include <cstring>

namespace dtrain::paramserver {
namespace {

// Gradient values read from float32 bytes at any alignment (a push is read
// where it was received, in the gRPC buffers): each load is a 4-byte memcpy,
// which GCC turns into unaligned vector loads.
struct Grad {
  const uint8_t* __restrict bytes;
  float operator[](int64_t i) const {
    float x;
    std::memcpy(&x, bytes + 4 * i, sizeof x);
    return x;
  }
};

// One SGD step over n elements, in torch::optim::SGD's order of operations
// (so results match it bit for bit): parameters read from `in`, written to
// `out`; kInPlace when they are the same array.
template <bool kInPlace, bool kDecay, bool kMomentum, bool kNesterov, bool kFirst>
void SgdLoop(const float* in, float* out, Grad g, float* __restrict buf, int64_t n, float lr, float wd, float mom) {
  if (kInPlace) {
    float* __restrict p = out;
    for (int64_t i = 0; i < n; ++i) {
      float d = kDecay ? g[i] + wd * p[i] : g[i];
      if (kMomentum) {
        const float b = kFirst ? d : buf[i] * mom + d;
        buf[i] = b;
        d = kNesterov ? d + mom * b : b;
      }
      p[i] -= lr * d;
    }
    return;
  }
  const float* __restrict pin = in;
  float* __restrict pout = out;
  for (int64_t i = 0; i < n; ++i) {
    float d = kDecay ? g[i] + wd * pin[i] : g[i];
    if (kMomentum) {
      const float b = kFirst ? d : buf[i] * mom + d;
      buf[i] = b;
      d = kNesterov ? d + mom * b : b;
    }
    pout[i] = pin[i] - lr * d;
  }
}

template <bool kInPlace>
void SgdDispatch(bool decay, bool momentum, bool nesterov, bool first, const float* in, float* out, Grad g, float* buf,
                 int64_t n, float lr, float wd, float mom) {
  if (!momentum) {
    if (decay) SgdLoop<kInPlace, true, false, false, false>(in, out, g, buf, n, lr, wd, mom);
    if (!decay) SgdLoop<kInPlace, false, false, false, false>(in, out, g, buf, n, lr, wd, mom);
    return;
  }
  if (decay && nesterov && first) SgdLoop<kInPlace, true, true, true, true>(in, out, g, buf, n, lr, wd, mom);
  if (decay && nesterov && !first) SgdLoop<kInPlace, true, true, true, false>(in, out, g, buf, n, lr, wd, mom);
  if (decay && !nesterov && first) SgdLoop<kInPlace, true, true, false, true>(in, out, g, buf, n, lr, wd, mom);
  if (decay && !nesterov && !first) SgdLoop<kInPlace, true, true, false, false>(in, out, g, buf, n, lr, wd, mom);
  if (!decay && nesterov && first) SgdLoop<kInPlace, false, true, true, true>(in, out, g, buf, n, lr, wd, mom);
  if (!decay && nesterov && !first) SgdLoop<kInPlace, false, true, true, false>(in, out, g, buf, n, lr, wd, mom);
  if (!decay && !nesterov && first) SgdLoop<kInPlace, false, true, false, true>(in, out, g, buf, n, lr, wd, mom);
  if (!decay && !nesterov && !first) SgdLoop<kInPlace, false, true, false, false>(in, out, g, buf, n, lr, wd, mom);
}

// torch::optim::AdamW: decoupled decay, then the moments, bias-corrected.
template <bool kInPlace>
void AdamWLoop(const float* in, float* out, Grad g, float* __restrict m, float* __restrict v, int64_t n, float decay,
               float b1, float b2, float eps, float step_size, float sqrt_bc2) {
  if (kInPlace) {
    float* __restrict p = out;
    for (int64_t i = 0; i < n; ++i) {
      p[i] *= decay;
      m[i] = m[i] * b1 + g[i] * (1.0f - b1);
      v[i] = v[i] * b2 + g[i] * g[i] * (1.0f - b2);
      const float denom = std::sqrt(v[i]) / sqrt_bc2 + eps;
      p[i] -= step_size * (m[i] / denom);
    }
    return;
  }
  const float* __restrict pin = in;
  float* __restrict pout = out;
  for (int64_t i = 0; i < n; ++i) {
    const float p = pin[i] * decay;
    m[i] = m[i] * b1 + g[i] * (1.0f - b1);
    v[i] = v[i] * b2 + g[i] * g[i] * (1.0f - b2);
    const float denom = std::sqrt(v[i]) / sqrt_bc2 + eps;
    pout[i] = p - step_size * (m[i] / denom);
  }
}

}  // namespace

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
  Run(Begin(n, lr, s), p, p, g, 0, n);
}

ServerOptimizer::Step ServerOptimizer::Begin(int64_t n, double lr, SlotState* s) const {
  Step st;
  st.state = s;
  st.lr = static_cast<float>(lr);
  ++s->step;
  if (config_.kind() == OptimizerConfig::ADAMW) {
    if (s->exp_avg.empty()) {
      s->exp_avg.assign(static_cast<size_t>(n), 0.f);
      s->exp_avg_sq.assign(static_cast<size_t>(n), 0.f);
    }
    const double bc1 = 1.0 - std::pow(static_cast<double>(config_.beta1()), static_cast<double>(s->step));
    const double bc2 = 1.0 - std::pow(static_cast<double>(config_.beta2()), static_cast<double>(s->step));
    st.step_size = static_cast<float>(lr / bc1);
    st.sqrt_bias_correction2 = static_cast<float>(std::sqrt(bc2));
    return st;
  }
  if (config_.momentum() > 0) {
    st.first = s->momentum_buffer.empty();
    if (st.first) s->momentum_buffer.resize(static_cast<size_t>(n));
  }
  return st;
}

void ServerOptimizer::Run(const Step& st, const float* in, float* out, const void* grad, int64_t begin,
                          int64_t count) const {
  const Grad g{static_cast<const uint8_t*>(grad)};
  const float wd = config_.weight_decay();
  SlotState* s = st.state;
  const bool in_place = in == out;
  in += begin;
  out += begin;
  if (config_.kind() == OptimizerConfig::ADAMW) {
    const float decay = 1.0f - st.lr * wd;
    float* m = s->exp_avg.data() + begin;
    float* v = s->exp_avg_sq.data() + begin;
    if (in_place) {
      AdamWLoop<true>(in, out, g, m, v, count, decay, config_.beta1(), config_.beta2(), config_.eps(), st.step_size,
                      st.sqrt_bias_correction2);
    } else {
      AdamWLoop<false>(in, out, g, m, v, count, decay, config_.beta1(), config_.beta2(), config_.eps(), st.step_size,
                       st.sqrt_bias_correction2);
    }
    return;
  }
  // torch::optim::SGD: d = g + wd * p; buf = d (first step) or
  // momentum * buf + d; d = d + momentum * buf (Nesterov) or buf.
  const float mom = config_.momentum();
  float* buf = mom > 0 ? s->momentum_buffer.data() + begin : nullptr;
  if (in_place) {
    SgdDispatch<true>(wd != 0, mom > 0, config_.nesterov(), st.first, in, out, g, buf, count, st.lr, wd, mom);
  } else {
    SgdDispatch<false>(wd != 0, mom > 0, config_.nesterov(), st.first, in, out, g, buf, count, st.lr, wd, mom);
  }
}

}  // namespace dtrain::paramserver
