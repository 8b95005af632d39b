// The per-element Adam math of the compact-state step (masked_adamw.cu). The CPL steps do not use
// it: their Adam is the step engine's AdamDirection (directions.cuh). It is cpl_kernels/reference.py's arithmetic
// operation by operation in fp32, each operation correctly rounded on its own, in the order of
// the C++ kernels (csrc/cpu/adam_math.h), with explicit round-to-nearest intrinsics (__fmul_rn,
// __fadd_rn, __fsub_rn, __fdiv_rn, __fsqrt_rn): nvcc contracts a*b+c into an FMA wherever it
// likes by default (-fmad=true), and the _rn intrinsics are never contracted; it would also use
// approximate division/sqrt under --use_fast_math (setup.py does not pass it). No FMA anywhere:
// the reference and the CPU kernels round the product and the sum separately, and a fused
// rounding (the old oracle's, torch's add_(alpha=)) moved 1,181 of 4,096 exp_avg by an ulp after
// one AdamW step.
#pragma once

#include "common.cuh"

namespace cpl_cuda {

struct AdamElementConsts {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, bc1, bc2_sqrt, eps, wd;
};

__host__ __device__ inline AdamElementConsts make_adam_consts(const AdamHyper& h) {
  AdamElementConsts k;
  k.lr = h.lr;
  k.beta1 = h.beta1;
  k.beta2 = h.beta2;
  k.one_minus_beta1 = h.one_minus_beta1;
  k.one_minus_beta2 = h.one_minus_beta2;
  k.bc1 = h.bias_correction1;
  k.bc2_sqrt = h.bias_correction2_sqrt;
  k.eps = h.eps;
  k.wd = h.weight_decay;
  return k;
}

// m = m*b1 + (1-b1)*g;  v = v*b2 + ((1-b2)*g)*g  (reference.py _adam_direction).
__device__ __forceinline__ void adam_update_state(float g, float& m, float& v, const AdamElementConsts& k) {
  m = __fadd_rn(__fmul_rn(m, k.beta1), __fmul_rn(k.one_minus_beta1, g));
  v = __fadd_rn(__fmul_rn(v, k.beta2), __fmul_rn(__fmul_rn(k.one_minus_beta2, g), g));
}

// (m / bc1) / (sqrt(v) / sqrt(bc2) + eps), from the updated m and v.
__device__ __forceinline__ float adam_direction_of(float m, float v, const AdamElementConsts& k) {
  return __fdiv_rn(__fdiv_rn(m, k.bc1), __fadd_rn(__fdiv_rn(__fsqrt_rn(v), k.bc2_sqrt), k.eps));
}

}  // namespace cpl_cuda
