// The Adam arithmetic shared by the CPL step and the compact-state masked step. The oracle,
// cpl_kernels/reference.py, spells out the same rounding (adam_hyper mirrors make_adam_hyper,
// _adam_direction mirrors adam_direction) and the tests hold the kernels to it bit for bit: change
// both together. Every operation is rounded on its own, so the build must not contract a*b + c
// into an FMA (simd.h: the AVX2 clone is compiled without FMA).
#pragma once

#include <cmath>
#include <cstdint>

#include "simd.h"

namespace cpl {
namespace cpu {

struct AdamHyper {
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction1, bias_correction2_sqrt,
      eps, weight_decay;
};

// Bias corrections in double, then everything rounded once to fp32 (as the reference's scalars).
inline AdamHyper make_adam_hyper(double step, double lr, double beta1, double beta2, double eps,
                                 double weight_decay) {
  return AdamHyper{static_cast<float>(lr),
                   static_cast<float>(beta1),
                   static_cast<float>(beta2),
                   static_cast<float>(1.0 - beta1),
                   static_cast<float>(1.0 - beta2),
                   static_cast<float>(1.0 - std::pow(beta1, step)),
                   static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step))),
                   static_cast<float>(eps),
                   static_cast<float>(weight_decay)};
}

// Updates m[j], v[j] with gradient g and returns Adam's direction mhat / (sqrt(vhat) + eps).
CPL_INLINE float adam_direction(float g, float* __restrict m, float* __restrict v, int64_t j,
                                const AdamHyper& h) {
  const float mi = m[j] * h.beta1 + h.one_minus_beta1 * g;
  const float vi = v[j] * h.beta2 + h.one_minus_beta2 * g * g;
  m[j] = mi;
  v[j] = vi;
  return (mi / h.bias_correction1) / (std::sqrt(vi) / h.bias_correction2_sqrt + h.eps);
}

}  // namespace cpu
}  // namespace cpl
