// The optimizer kinds of the step engine (cpl::cpl_step_, csrc/cpu/step.cpp): per kind, how the
// update u and the new state follow from g, p and the old state (its "direction"), and the fp32
// scalars it needs, derived in ONE place (`scalars`) from the kind's `hyper` list, step and lr.
// The CPL rule around them is written once, in engine.h. Contract and operation order:
// cpl_kernels/reference_step.py (DIRECTIONS, scalars); hyper order: cpl_kernels/kinds.py.
//
// Adding a kind on the C++ side touches this file only: one struct below (name, hyper names,
// state slots, scalars, checks, its Direction template and `visit`, which picks the Direction's
// compile-time variant from the scalars) and one entry in `Kinds` at the bottom. step.cpp looks
// kinds up, validates and dispatches through `Kinds` generically; engine.h needs nothing.
// (Python side: kinds.py and reference_step.py; GPU backends: their own directions files.)
//
// A Direction D provides (all inline, vectorised by the engine's `omp simd` loop):
//   static constexpr int kStates;          state slots read and written (0, 1 or 2)
//   float lr;                              the step p <- p - lr * u
//   float pre(float g, float p) const;     g before the rule (L2 decay folded into g)
//   float step(float g, float p, float& s1, float& s2) const;
//                                          returns u; s1, s2 hold the old state on entry and the
//                                          new state on return (registers: the engine stores
//                                          them, or keeps the old values where g was not finite)
// Arithmetic is one correctly rounded fp32 operation at a time, no FMA (simd.h), written in the
// reference's order: `a * b + c * d` is add(mul(a, b), mul(c, d)), `a * b * c` is mul(mul(a, b), c).
// Variants (decay on/off, momentum mode) are template parameters, so the loop carries no flag
// tests (the pre-engine SGD kernel measured a runtime decay test at 22 ms vs 9 ms for 16M fp32
// with codes).
#pragma once

#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#include "simd.h"

namespace cpl {
namespace cpu {
namespace kinds {

// ---- Adam / AdamW --------------------------------------------------------------------------------

struct AdamScalars {
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction1, bias_correction2_sqrt, eps,
      weight_decay;
};

// hyper: beta1, beta2, eps, weight_decay. Bias corrections in double, then every scalar rounded once
// to fp32 (reference_step.scalars).
inline AdamScalars adam_scalars(const double* h, double step, double lr) {
  return AdamScalars{static_cast<float>(lr),
                     static_cast<float>(h[0]),
                     static_cast<float>(h[1]),
                     static_cast<float>(1.0 - h[0]),
                     static_cast<float>(1.0 - h[1]),
                     static_cast<float>(1.0 - std::pow(h[0], step)),
                     static_cast<float>(std::sqrt(1.0 - std::pow(h[1], step))),
                     static_cast<float>(h[2]),
                     static_cast<float>(h[3])};
}

template <bool kL2, bool kDecoupled>
struct AdamDirection {
  static constexpr int kStates = 2;
  AdamScalars s;
  float lr;
  explicit AdamDirection(const AdamScalars& x) : s(x), lr(x.lr) {}
  CPL_INLINE float pre(float g, float p) const {
    if constexpr (kL2) return g + s.weight_decay * p;
    return g;
  }
  CPL_INLINE float step(float g, float p, float& m, float& v) const {
    m = m * s.beta1 + s.one_minus_beta1 * g;
    v = v * s.beta2 + s.one_minus_beta2 * g * g;
    float u = (m / s.bias_correction1) / (std::sqrt(v) / s.bias_correction2_sqrt + s.eps);
    if constexpr (kDecoupled) u = u + s.weight_decay * p;
    return u;
  }
};

inline constexpr std::array<const char*, 4> kAdamHyper{"beta1", "beta2", "eps", "weight_decay"};

// L2 decay (torch.optim.Adam): g += wd * p before the state update.
struct Adam {
  static constexpr const char* kName = "adam";
  static constexpr const auto& kHyper = kAdamHyper;
  static constexpr bool kUsesStep = true;
  static int slots(const double*) { return 2; }
  static void check(const double*) {}
  template <class Body>
  static void visit(const double* h, double step, double lr, const Body& body) {
    const AdamScalars s = adam_scalars(h, step, lr);
    // The fp32 value decides, as in the reference (`s.weight_decay != 0`): a wd that rounds to 0
    // must not add 0 * p (NaN where p is inf).
    if (s.weight_decay != 0.f) return body(AdamDirection<true, false>(s));
    return body(AdamDirection<false, false>(s));
  }
};

// Decoupled decay (torch.optim.AdamW): u += wd * p, so a frozen element is not decayed either.
struct AdamW {
  static constexpr const char* kName = "adamw";
  static constexpr const auto& kHyper = kAdamHyper;
  static constexpr bool kUsesStep = true;
  static int slots(const double*) { return 2; }
  static void check(const double*) {}
  template <class Body>
  static void visit(const double* h, double step, double lr, const Body& body) {
    const AdamScalars s = adam_scalars(h, step, lr);
    if (s.weight_decay != 0.f) return body(AdamDirection<false, true>(s));
    return body(AdamDirection<false, false>(s));  // the same instantiation as Adam without decay
  }
};

// ---- SGD (plain, heavy ball, Nesterov) ------------------------------------------------------------

struct SgdScalars {
  float lr, momentum, one_minus_dampening, weight_decay;
  bool init_buffer;  // first step: the buffer starts as the gradient, undamped (torch.optim.SGD)
};

enum Momentum : int { kPlain = 0, kHeavyBall = 1, kNesterov = 2 };

template <int kMom, bool kDecay>
struct SgdDirection {
  static constexpr int kStates = kMom == kPlain ? 0 : 1;
  SgdScalars s;
  float lr;
  explicit SgdDirection(const SgdScalars& x) : s(x), lr(x.lr) {}
  CPL_INLINE float pre(float g, float p) const {
    if constexpr (kDecay) return g + s.weight_decay * p;
    return g;
  }
  CPL_INLINE float step(float g, float, float& buf, float&) const {
    if constexpr (kMom == kPlain) {
      return g;
    } else {
      // A bit select, not a ternary: GCC turned `init_buffer ? g : ...` into a branch and left the
      // loop scalar (the pre-engine SGD kernel: 28 ms vs 13 ms for 16M fp32 with codes).
      buf = select_bits(s.init_buffer, g, buf * s.momentum + s.one_minus_dampening * g);
      if constexpr (kMom == kNesterov) return g + s.momentum * buf;
      return buf;
    }
  }
};

// hyper: momentum, dampening, weight_decay, nesterov, init_buffer (the last two 0 or 1).
struct Sgd {
  static constexpr const char* kName = "sgd";
  static constexpr std::array<const char*, 5> kHyper{"momentum", "dampening", "weight_decay", "nesterov",
                                                     "init_buffer"};
  static constexpr bool kUsesStep = false;
  static int slots(const double* h) { return h[0] != 0.0 ? 1 : 0; }  // the buffer only with momentum
  static void check(const double* h) {
    TORCH_CHECK_VALUE(h[3] == 0.0 || (h[0] > 0.0 && h[1] == 0.0),
                      "cpl.cpl_step_: nesterov needs momentum > 0 and dampening == 0");
  }
  template <class Body>
  static void visit(const double* h, double, double lr, const Body& body) {
    const SgdScalars s{static_cast<float>(lr), static_cast<float>(h[0]), static_cast<float>(1.0 - h[1]),
                       static_cast<float>(h[2]), h[4] != 0.0};
    const bool nesterov = h[3] != 0.0;
    const auto with = [&]<bool kDecay>() {
      if (h[0] == 0.0) return body(SgdDirection<kPlain, kDecay>(s));
      if (nesterov) return body(SgdDirection<kNesterov, kDecay>(s));
      return body(SgdDirection<kHeavyBall, kDecay>(s));
    };
    if (s.weight_decay != 0.f) return with.template operator()<true>();
    return with.template operator()<false>();
  }
};

// ---- Lion (Chen et al. 2023) -------------------------------------------------------------------------

struct LionScalars {
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, weight_decay;
};

template <bool kDecay>
struct LionDirection {
  static constexpr int kStates = 1;
  LionScalars s;
  float lr;
  explicit LionDirection(const LionScalars& x) : s(x), lr(x.lr) {}
  CPL_INLINE float pre(float g, float) const { return g; }
  CPL_INLINE float step(float g, float p, float& m, float&) const {
    const float c = m * s.beta1 + s.one_minus_beta1 * g;
    // torch.sign: +1, -1, and +0 for +-0 and NaN; (c > 0) - (c < 0) is exactly that (0.f - 0.f = +0).
    float u = static_cast<float>(c > 0.f) - static_cast<float>(c < 0.f);
    if constexpr (kDecay) u = u + s.weight_decay * p;
    m = m * s.beta2 + s.one_minus_beta2 * g;
    return u;
  }
};

// hyper: beta1, beta2, weight_decay. u = sign(b1*m + (1-b1)*g) (+ wd*p); m = b2*m + (1-b2)*g.
struct Lion {
  static constexpr const char* kName = "lion";
  static constexpr std::array<const char*, 3> kHyper{"beta1", "beta2", "weight_decay"};
  static constexpr bool kUsesStep = false;
  static int slots(const double*) { return 1; }
  static void check(const double*) {}
  template <class Body>
  static void visit(const double* h, double, double lr, const Body& body) {
    const LionScalars s{static_cast<float>(lr),         static_cast<float>(h[0]), static_cast<float>(h[1]),
                        static_cast<float>(1.0 - h[0]), static_cast<float>(1.0 - h[1]), static_cast<float>(h[2])};
    if (s.weight_decay != 0.f) return body(LionDirection<true>(s));
    return body(LionDirection<false>(s));
  }
};

// ---- MoFO (Chen et al., TMLR 2025: Momentum-Filtered Optimizer) ----------------------------------------

// AdamW's direction with MoFO's filter: m and v are updated for every element, u is kept only where
// |m_new| >= threshold (the tensor's top-alpha momentum, chosen by the caller) and is +0 elsewhere,
// so a filtered element keeps its value, decay included. `!(|m| >= t)` also drops a NaN momentum.
template <bool kDecay>
struct MofoDirection : AdamDirection<false, kDecay> {
  float threshold;
  MofoDirection(const AdamScalars& x, float t) : AdamDirection<false, kDecay>(x), threshold(t) {}
  CPL_INLINE float step(float g, float p, float& m, float& v) const {
    const float u = AdamDirection<false, kDecay>::step(g, p, m, v);
    return keep_unless(u, !(std::fabs(m) >= threshold));
  }
};

// hyper: beta1, beta2, eps, weight_decay, threshold (>= 0; 0 keeps every non-NaN element: AdamW).
struct Mofo {
  static constexpr const char* kName = "mofo";
  static constexpr std::array<const char*, 5> kHyper{"beta1", "beta2", "eps", "weight_decay", "threshold"};
  static constexpr bool kUsesStep = true;
  static int slots(const double*) { return 2; }
  static void check(const double*) {}
  template <class Body>
  static void visit(const double* h, double step, double lr, const Body& body) {
    const AdamScalars s = adam_scalars(h, step, lr);
    const float threshold = static_cast<float>(h[4]);
    if (s.weight_decay != 0.f) return body(MofoDirection<true>(s, threshold));
    return body(MofoDirection<false>(s, threshold));
  }
};

// ---- the kind table ------------------------------------------------------------------------------------

using Kinds = std::tuple<Adam, AdamW, Sgd, Lion, Mofo>;  // the order of cpl_kernels/kinds.py KINDS

// Calls f.template operator()<K>() for each kind K in order until it returns true.
template <class F>
bool any_kind(const F& f) {
  return std::apply([&](auto... k) { return (f.template operator()<decltype(k)>() || ...); }, Kinds{});
}

inline std::string kind_names() {
  std::string out = "(";
  bool first = true;
  any_kind([&]<class K>() {
    out += std::string(first ? "" : ", ") + "'" + K::kName + "'";
    first = false;
    return false;
  });
  return out + ")";
}

// Range checks by hyperparameter name (kinds.check_hyper's, with its messages).
inline void check_named_hyper(const char* name, double v) {
  const std::string n(name);
  TORCH_CHECK_VALUE(std::isfinite(v), "cpl.cpl_step_: hyperparameter '", n, "' must be a finite number, got ", v);
  if (n == "beta1" || n == "beta2")
    TORCH_CHECK_VALUE(v >= 0.0 && v < 1.0, "cpl.cpl_step_: hyperparameter '", n, "' must be in [0, 1), got ", v);
  if (n == "eps" || n == "weight_decay" || n == "momentum" || n == "dampening" || n == "threshold")
    TORCH_CHECK_VALUE(v >= 0.0, "cpl.cpl_step_: hyperparameter '", n, "' must be >= 0, got ", v);
  if (n == "nesterov" || n == "init_buffer")
    TORCH_CHECK_VALUE(v == 0.0 || v == 1.0, "cpl.cpl_step_: hyperparameter '", n, "' must be 0 or 1, got ", v);
}

}  // namespace kinds
}  // namespace cpu
}  // namespace cpl
