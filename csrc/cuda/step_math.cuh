// The per-element math of the fused steps, shared by the single- and multi-tensor kernels (and
// masked_adamw.cu) so they can never drift apart. It is cpl_kernels/reference.py's arithmetic
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
  bool l2_decay, decoupled_decay, update_criterion, strict;
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
  k.l2_decay = !h.decoupled && h.weight_decay != 0.f;
  k.decoupled_decay = h.decoupled && h.weight_decay != 0.f;
  k.update_criterion = h.criterion == Criterion::kUpdate;
  k.strict = h.strict;
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

// Updates p (fp32 copy), m, v in place; returns true when the element is conflicting.
__device__ __forceinline__ bool adam_element(float& p, float g, float& m, float& v, int s,
                                             const AdamElementConsts& k) {
  if (k.l2_decay) g = __fadd_rn(g, __fmul_rn(k.wd, p));
  bool ok = true;
  if (!k.update_criterion) {
    ok = collaborative(g, s);
    if (!ok) g = 0.f;  // the state only accumulates collaborative gradient
  }
  adam_update_state(g, m, v, k);
  float u = adam_direction_of(m, v, k);
  if (k.decoupled_decay) u = __fadd_rn(u, __fmul_rn(k.wd, p));
  if (k.update_criterion) ok = collaborative(u, s);
  if (ok || !(k.update_criterion || k.strict)) p = __fsub_rn(p, __fmul_rn(k.lr, u));
  return !ok;
}

struct SgdElementConsts {
  float lr, momentum, one_minus_dampening, wd;
  bool has_momentum, nesterov, init_buffer, update_criterion, strict;
};

__host__ __device__ inline SgdElementConsts make_sgd_consts(const SgdHyper& h) {
  SgdElementConsts k;
  k.lr = h.lr;
  k.momentum = h.momentum;
  k.one_minus_dampening = h.one_minus_dampening;
  k.wd = h.weight_decay;
  k.has_momentum = h.momentum != 0.f;
  k.nesterov = h.nesterov;
  k.init_buffer = h.init_buffer;
  k.update_criterion = h.criterion == Criterion::kUpdate;
  k.strict = h.strict;
  return k;
}

// buf is read only when has_momentum && !init_buffer, written when has_momentum.
__device__ __forceinline__ bool sgd_element(float& p, float g, float& buf, int s,
                                            const SgdElementConsts& k) {
  if (k.wd != 0.f) g = __fadd_rn(g, __fmul_rn(k.wd, p));
  bool ok = true;
  if (!k.update_criterion) {
    ok = collaborative(g, s);
    if (!ok) g = 0.f;
  }
  float u = g;
  if (k.has_momentum) {
    buf = k.init_buffer ? g : __fadd_rn(__fmul_rn(buf, k.momentum), __fmul_rn(k.one_minus_dampening, g));
    u = k.nesterov ? __fadd_rn(g, __fmul_rn(k.momentum, buf)) : buf;
  }
  if (k.update_criterion) ok = collaborative(u, s);
  if (ok || !(k.update_criterion || k.strict)) p = __fsub_rn(p, __fmul_rn(k.lr, u));
  return !ok;
}

// One thread's VEC consecutive elements starting at i (VEC divides 16, so one code word).
// VEC > 1 only when every pointer is aligned for it (checked on the host) and i + VEC <= n.
template <typename T, int VEC>
__device__ __forceinline__ unsigned adam_run(T* param, const T* grad, float* m_ptr, float* v_ptr,
                                             const int32_t* codes, int64_t i,
                                             const AdamElementConsts& k) {
  float p[VEC], g[VEC], m[VEC], v[VEC];
  load_f32<T, VEC>(param + i, p);
  load_f32<T, VEC>(grad + i, g);
  load_f32<float, VEC>(m_ptr + i, m);
  load_f32<float, VEC>(v_ptr + i, v);
  const uint32_t word = codes ? static_cast<uint32_t>(__ldg(codes + i / 16)) : 0u;
  unsigned conflicting = 0;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    conflicting += adam_element(p[e], g[e], m[e], v[e], decode_sign(word, static_cast<int>((i + e) % 16)), k);
  }
  store_f32<float, VEC>(m_ptr + i, m);
  store_f32<float, VEC>(v_ptr + i, v);
  store_f32<T, VEC>(param + i, p);
  return conflicting;
}

template <typename T, int VEC>
__device__ __forceinline__ unsigned sgd_run(T* param, const T* grad, float* buf_ptr,
                                            const int32_t* codes, int64_t i,
                                            const SgdElementConsts& k) {
  float p[VEC], g[VEC], b[VEC];
  load_f32<T, VEC>(param + i, p);
  load_f32<T, VEC>(grad + i, g);
  if (k.has_momentum && !k.init_buffer) {
    load_f32<float, VEC>(buf_ptr + i, b);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) b[e] = 0.f;
  }
  const uint32_t word = codes ? static_cast<uint32_t>(__ldg(codes + i / 16)) : 0u;
  unsigned conflicting = 0;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    conflicting += sgd_element(p[e], g[e], b[e], decode_sign(word, static_cast<int>((i + e) % 16)), k);
  }
  if (k.has_momentum) store_f32<float, VEC>(buf_ptr + i, b);
  store_f32<T, VEC>(param + i, p);
  return conflicting;
}

}  // namespace cpl_cuda
