// Per-kind parts of the CUDA step engine (engine.cuh): for each kind of cpl_kernels/kinds.py, how
// the update u and the new state follow from g, p and the state (reference_step.DIRECTIONS). The
// CPL rule around them is written once, in engine.cuh; nothing here touches memory.
//
// Adding a kind touches, besides the shared Python (cpl_kernels/kinds.py: name, hyper order,
// slots; reference_step.py: its scalars and direction, the contract), ONE CUDA file: this one
// (a functor below and its entry in `Directions`). step_engine.cu instantiates the engine for
// every entry and register.cpp reads the names, hyper counts and state slots through
// kernels.cuh's step_kind_* functions, so neither changes. The Triton engine likewise needs one:
// cpl_kernels/triton/directions.py.
//
// A direction functor D provides:
//   kName, kNumHyper                 the kind's name and the length of its `hyper` list
//   static int state_slots(hyper)    state tensors per param (kinds.state_slots)
//   static D make(hyper)             host: the step-independent scalars, computed in double and
//                                    rounded to fp32 once (reference_step.scalars)
//   set_step(t)                      device, once per block: the step-dependent scalars
//   reads_state1/2, writes_state1/2  which slots are loaded and stored (uniform per launch)
//   pre(g, p)                        g before the rule (L2 decay)
//   direction(g, p, s1, s2)          u; updates s1, s2 in registers
// D must be trivially copyable: it is a by-value kernel argument next to the tensor table.
//
// Arithmetic: reference_step.py's operations in its order, each correctly rounded on its own:
// explicit __fmul_rn/__fadd_rn/__fdiv_rn/__fsqrt_rn, which nvcc never contracts into an FMA
// (it contracts a plain a*b+c by default, -fmad=true) nor replaces by approximations.
#pragma once

#include <cmath>

#include "common.cuh"

namespace cpl_cuda {

template <class... Ds>
struct DirectionList {};

// Adam (L2 decay folded into g, torch.optim.Adam) and AdamW (decoupled decay in u).
// hyper: beta1, beta2, eps, weight_decay.
template <bool kDecoupled>
struct AdamDirection {
  static constexpr const char* kName = kDecoupled ? "adamw" : "adam";
  static constexpr int kNumHyper = 4;
  double beta1_d, beta2_d;  // the bias corrections are derived in double from the device step
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, wd;
  float bc1, bc2_sqrt;      // set_step

  static int state_slots(const double*) { return 2; }
  static AdamDirection make(const double* h) {
    AdamDirection d{};
    d.beta1_d = h[0];
    d.beta2_d = h[1];
    d.beta1 = static_cast<float>(h[0]);
    d.beta2 = static_cast<float>(h[1]);
    d.one_minus_beta1 = static_cast<float>(1.0 - h[0]);
    d.one_minus_beta2 = static_cast<float>(1.0 - h[1]);
    d.eps = static_cast<float>(h[2]);
    d.wd = static_cast<float>(h[3]);
    d.bc1 = d.bc2_sqrt = 1.f;
    return d;
  }
  // As reference_step.scalars: 1 - b1^t and sqrt(1 - b2^t) in double, rounded once. (CUDA's
  // double pow is within 2 ulp of the host's, so the fp32 results agree except when the double
  // lands within 2 ulp of an fp32 rounding boundary.)
  __device__ void set_step(double t) {
    bc1 = static_cast<float>(1.0 - pow(beta1_d, t));
    bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(beta2_d, t)));
  }
  __device__ bool reads_state1() const { return true; }
  __device__ bool reads_state2() const { return true; }
  __device__ bool writes_state1() const { return true; }
  __device__ bool writes_state2() const { return true; }
  __device__ float pre(float g, float p) const {
    return (!kDecoupled && wd != 0.f) ? __fadd_rn(g, __fmul_rn(wd, p)) : g;
  }
  __device__ float direction(float g, float p, float& m, float& v) const {
    m = __fadd_rn(__fmul_rn(m, beta1), __fmul_rn(one_minus_beta1, g));
    v = __fadd_rn(__fmul_rn(v, beta2), __fmul_rn(__fmul_rn(one_minus_beta2, g), g));
    float u = __fdiv_rn(__fdiv_rn(m, bc1), __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2_sqrt), eps));
    if (kDecoupled && wd != 0.f) u = __fadd_rn(u, __fmul_rn(wd, p));  // frozen means not decayed
    return u;
  }
};

// torch.optim.SGD: hyper momentum, dampening, weight_decay, nesterov (0/1), init_buffer (0/1:
// the first momentum step, buffer = gradient). Without momentum there is no state.
struct SgdDirection {
  static constexpr const char* kName = "sgd";
  static constexpr int kNumHyper = 5;
  float momentum, one_minus_dampening, wd;
  bool has_momentum, nesterov, init_buffer;

  static int state_slots(const double* h) { return h[0] != 0.0 ? 1 : 0; }
  static SgdDirection make(const double* h) {
    SgdDirection d{};
    d.momentum = static_cast<float>(h[0]);
    d.one_minus_dampening = static_cast<float>(1.0 - h[1]);
    d.wd = static_cast<float>(h[2]);
    d.has_momentum = h[0] != 0.0;
    d.nesterov = h[3] != 0.0;
    d.init_buffer = h[4] != 0.0;
    return d;
  }
  __device__ void set_step(double) {}
  __device__ bool reads_state1() const { return has_momentum && !init_buffer; }
  __device__ bool reads_state2() const { return false; }
  __device__ bool writes_state1() const { return has_momentum; }
  __device__ bool writes_state2() const { return false; }
  __device__ float pre(float g, float p) const { return wd != 0.f ? __fadd_rn(g, __fmul_rn(wd, p)) : g; }
  __device__ float direction(float g, float, float& buf, float&) const {
    if (!has_momentum) return g;
    buf = init_buffer ? g : __fadd_rn(__fmul_rn(buf, momentum), __fmul_rn(one_minus_dampening, g));
    return nesterov ? __fadd_rn(g, __fmul_rn(momentum, buf)) : buf;
  }
};

// Lion (Chen et al. 2023): u = sign(b1*m + (1-b1)*g) + wd*p; m = b2*m + (1-b2)*g.
// hyper: beta1, beta2, weight_decay.
struct LionDirection {
  static constexpr const char* kName = "lion";
  static constexpr int kNumHyper = 3;
  float beta1, beta2, one_minus_beta1, one_minus_beta2, wd;

  static int state_slots(const double*) { return 1; }
  static LionDirection make(const double* h) {
    LionDirection d{};
    d.beta1 = static_cast<float>(h[0]);
    d.beta2 = static_cast<float>(h[1]);
    d.one_minus_beta1 = static_cast<float>(1.0 - h[0]);
    d.one_minus_beta2 = static_cast<float>(1.0 - h[1]);
    d.wd = static_cast<float>(h[2]);
    return d;
  }
  __device__ void set_step(double) {}
  __device__ bool reads_state1() const { return true; }
  __device__ bool reads_state2() const { return false; }
  __device__ bool writes_state1() const { return true; }
  __device__ bool writes_state2() const { return false; }
  __device__ float pre(float g, float) const { return g; }
  __device__ float direction(float g, float p, float& m, float&) const {
    const float c = __fadd_rn(__fmul_rn(m, beta1), __fmul_rn(one_minus_beta1, g));
    float u = c > 0.f ? 1.f : (c < 0.f ? -1.f : 0.f);  // torch.sign: 0 for +-0 and NaN
    if (wd != 0.f) u = __fadd_rn(u, __fmul_rn(wd, p));
    m = __fadd_rn(__fmul_rn(m, beta2), __fmul_rn(one_minus_beta2, g));
    return u;
  }
};

// MoFO (Chen et al., TMLR 2025): AdamW's direction with the momentum filter. m and v are updated
// for every element; u is kept only where |m_new| >= threshold (the tensor's top-alpha momentum,
// chosen by the caller) and is 0 elsewhere, so a filtered element keeps its value, undecayed.
// hyper: beta1, beta2, eps, weight_decay, threshold.
struct MofoDirection {
  static constexpr const char* kName = "mofo";
  static constexpr int kNumHyper = 5;
  AdamDirection<true> adam;
  float threshold;

  static int state_slots(const double*) { return 2; }
  static MofoDirection make(const double* h) {
    MofoDirection d{};
    d.adam = AdamDirection<true>::make(h);
    d.threshold = static_cast<float>(h[4]);
    return d;
  }
  __device__ void set_step(double t) { adam.set_step(t); }
  __device__ bool reads_state1() const { return true; }
  __device__ bool reads_state2() const { return true; }
  __device__ bool writes_state1() const { return true; }
  __device__ bool writes_state2() const { return true; }
  __device__ float pre(float g, float p) const { return adam.pre(g, p); }
  __device__ float direction(float g, float p, float& m, float& v) const {
    const float u = adam.direction(g, p, m, v);
    return fabsf(m) >= threshold ? u : 0.f;  // false for a NaN m: filtered out
  }
};

// Every kind the CUDA engine serves (kinds.KINDS): a new kind is one more entry here.
using Directions =
    DirectionList<AdamDirection<false>, AdamDirection<true>, SgdDirection, LionDirection, MofoDirection>;

}  // namespace cpl_cuda
