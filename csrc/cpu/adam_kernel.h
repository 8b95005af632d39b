// The fused CPL Adam/AdamW loop (docs/design.md section 1), written so GCC vectorises it: no
// branches on data (the sign-code test is bit masks and selects), restrict pointers, a fixed
// 16-lane inner loop per code word under `omp simd`, and the weight-decay mode as a template
// argument rather than a per-element flag. fp32 math whatever the param dtype, in the same
// operation order as cpl_kernels/reference.py.
#pragma once

#include <cmath>

#include "adam_math.h"
#include "cpl_step.h"
#include "simd.h"

namespace cpl {
namespace cpu {

enum WeightDecay : int { kNoDecay = 0, kL2Decay = 1, kDecoupledDecay = 2 };



template <typename T>
struct AdamArgs {
  T* param;
  const T* grad;
  float* exp_avg;
  float* exp_avg_sq;
  const uint32_t* codes;  // null without a reference
  AdamHyper h;
};

// Updates element i (reference sign `sign`: +1, -1 or 0); returns 1 when it conflicts with the reference.
template <typename T, int kRule, int kWd>
CPL_INLINE int32_t adam_element(T* __restrict param, const T* __restrict grad, float* __restrict m,
                                float* __restrict v, int64_t i, float sign, const AdamHyper& h) {
  const float p = to_f32(param[i]);
  float g = to_f32(grad[i]);
  constexpr bool kGradient = kRule == kGradientStrict || kRule == kGradientSoft;
  if constexpr (kWd == kL2Decay) g += h.weight_decay * p;
  bool conflicting = false;
  if constexpr (kGradient) {
    conflicting = conflicts_sign(g, sign);
    g = conflicting ? 0.f : g;  // the state only ever sees collaborative gradient
  }
  float u = adam_direction(g, m, v, i, h);
  if constexpr (kWd == kDecoupledDecay) u += h.weight_decay * p;
  if constexpr (kRule == kUpdateRule) conflicting = conflicts_sign(u, sign);
  const bool frozen = kRule == kGradientSoft ? false : conflicting;
  store_f32(param, i, p - keep_unless(h.lr * u, frozen));
  return conflicting;
}

// Full code words [w0, w1): 16 elements each. Returns the conflicting count.
template <typename T, int kRule, int kWd>
CPL_INLINE int64_t adam_words(const AdamArgs<T>& a, int64_t w0, int64_t w1) {
  T* __restrict p = a.param;
  const T* __restrict g = a.grad;
  float* __restrict m = a.exp_avg;
  float* __restrict v = a.exp_avg_sq;
  const AdamHyper h = a.h;
  if constexpr (kRule == kNoReference) {
    // No reference: one flat loop, nothing to count.
#pragma omp simd
    for (int64_t i = w0 * 16; i < w1 * 16; ++i) adam_element<T, kNoReference, kWd>(p, g, m, v, i, 0.f, h);
    return 0;
  } else {
    return for_coded_lanes(a.codes, w0, w1, [&](int64_t i, float s) __attribute__((always_inline)) {
      return adam_element<T, kRule, kWd>(p, g, m, v, i, s, h);
    });
  }
}

// Elements [i0, n) of the last, partial code word (fewer than 16): scalar.
template <typename T, int kRule, int kWd>
int64_t adam_tail(const AdamArgs<T>& a, int64_t i0, int64_t n) {
  alignas(64) float sign[16] = {};
  if (kRule != kNoReference && i0 < n) expand_signs(a.codes[i0 / 16], sign);
  int64_t count = 0;
  for (int64_t i = i0; i < n; ++i)
    count += adam_element<T, kRule, kWd>(a.param, a.grad, a.exp_avg, a.exp_avg_sq, i,
                                                     sign[i % 16], a.h);
  return count;
}

template <typename T, int kRule, int kWd>
int64_t adam_words_base(const AdamArgs<T>& a, int64_t w0, int64_t w1) {
  return adam_words<T, kRule, kWd>(a, w0, w1);
}

template <typename T, int kRule, int kWd>
CPL_TARGET_AVX2 int64_t adam_words_avx2(const AdamArgs<T>& a, int64_t w0, int64_t w1) {
  return adam_words<T, kRule, kWd>(a, w0, w1);
}

}  // namespace cpu
}  // namespace cpl
