// Fused CPL SGD (+ momentum, dampening, Nesterov, L2 weight decay) step, as torch.optim.SGD.
// Same structure as the Adam step (adam_kernel.h): a branch-free element, a 16-lane loop per code
// word under `omp simd`, compiled for baseline x86-64 and for AVX2 (picked at run time).
#include "cpl_step.h"

namespace cpl {
namespace cpu {

namespace {

struct SgdHyper {
  float lr, momentum, one_minus_dampening, weight_decay;
  bool init_buffer;  // first step: the buffer starts as the gradient, undamped (torch.optim.SGD)
};

enum Momentum : int { kPlain = 0, kHeavyBall = 1, kNesterov = 2 };

template <typename T>
struct SgdArgs {
  T* param;
  const T* grad;
  float* buf;
  const uint32_t* codes;
  SgdHyper h;
};

template <typename T, int kRule, int kMom, bool kDecay>
CPL_INLINE int32_t sgd_element(T* __restrict param, const T* __restrict grad, float* __restrict buf, int64_t i,
                               float sign, const SgdHyper& h) {
  constexpr bool kGradient = kRule == kGradientStrict || kRule == kGradientSoft;
  const float p = to_f32(param[i]);
  float g = to_f32(grad[i]);
  if constexpr (kDecay) g += h.weight_decay * p;  // a template flag: see sgd_step_ below
  bool conflicting = false;
  if constexpr (kGradient) {
    conflicting = conflicts_sign(g, sign);
    g = conflicting ? 0.f : g;
  }
  float u = g;
  if constexpr (kMom != kPlain) {
    // A bit select, not a ternary: GCC turned `init_buffer ? g : ...` into a branch and left the
    // code-word loop scalar (16M fp32 with codes, 2 idle cores: 28 ms vs 13 ms without codes).
    const float b = select_bits(h.init_buffer, g, buf[i] * h.momentum + h.one_minus_dampening * g);
    buf[i] = b;
    u = kMom == kNesterov ? g + h.momentum * b : b;
  }
  if constexpr (kRule == kUpdateRule) conflicting = conflicts_sign(u, sign);
  const bool frozen = kRule == kGradientSoft ? false : conflicting;
  store_f32(param, i, p - keep_unless(h.lr * u, frozen));  // see keep_unless: why not a ternary
  return conflicting;
}

template <typename T, int kRule, int kMom, bool kDecay>
CPL_INLINE int64_t sgd_words(const SgdArgs<T>& a, int64_t w0, int64_t w1) {
  T* __restrict p = a.param;
  const T* __restrict g = a.grad;
  float* __restrict b = a.buf;
  const SgdHyper h = a.h;
  if constexpr (kRule == kNoReference) {
#pragma omp simd
    for (int64_t i = w0 * 16; i < w1 * 16; ++i) sgd_element<T, kNoReference, kMom, kDecay>(p, g, b, i, 0.f, h);
    return 0;
  } else {
    return for_coded_lanes(a.codes, w0, w1, [&](int64_t i, float s) __attribute__((always_inline)) {
      return sgd_element<T, kRule, kMom, kDecay>(p, g, b, i, s, h);
    });
  }
}

template <typename T, int kRule, int kMom, bool kDecay>
int64_t sgd_words_base(const SgdArgs<T>& a, int64_t w0, int64_t w1) {
  return sgd_words<T, kRule, kMom, kDecay>(a, w0, w1);
}

template <typename T, int kRule, int kMom, bool kDecay>
CPL_TARGET_AVX2 int64_t sgd_words_avx2(const SgdArgs<T>& a, int64_t w0, int64_t w1) {
  return sgd_words<T, kRule, kMom, kDecay>(a, w0, w1);
}

template <typename T, int kRule, int kMom, bool kDecay>
int64_t sgd_step(const SgdArgs<T>& a, int64_t n) {
  const bool avx2 = cpu_has_avx2();
  return run_words(
      n,
      [&](int64_t w0, int64_t w1) {
        return avx2 ? sgd_words_avx2<T, kRule, kMom, kDecay>(a, w0, w1) : sgd_words_base<T, kRule, kMom, kDecay>(a, w0, w1);
      },
      [&](int64_t i0) {
        alignas(64) float sign[16] = {};
        if (kRule != kNoReference && i0 < n) expand_signs(a.codes[i0 / 16], sign);
        int64_t count = 0;
        for (int64_t i = i0; i < n; ++i) count += sgd_element<T, kRule, kMom, kDecay>(a.param, a.grad, a.buf, i, sign[i % 16], a.h);
        return count;
      });
}

}  // namespace

at::Tensor cpl_sgd_step_(const at::Tensor& param, const at::Tensor& grad,
                         const std::optional<at::Tensor>& momentum_buffer,
                         const std::optional<at::Tensor>& codes, double lr, double momentum,
                         double dampening, double weight_decay, bool nesterov, bool init_buffer,
                         c10::string_view criterion, bool strict) {
  const char* op = "cpl_sgd_step_";
  check_float_param(param, op, "param");
  const int64_t n = param.numel();
  check_exact(grad, op, "grad", param.scalar_type(), n);
  const bool has_momentum = momentum != 0.0;
  float* buf = nullptr;
  if (has_momentum) {
    TORCH_CHECK(momentum_buffer.has_value(), "cpl.", op,
                ": argument 'momentum_buffer' is required when momentum != 0");
    check_exact(*momentum_buffer, op, "momentum_buffer", at::kFloat, n);
    buf = momentum_buffer->mutable_data_ptr<float>();
  }
  const uint32_t* code_words = codes_ptr(codes, n, op);
  const SgdHyper h{static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
                   static_cast<float>(weight_decay), init_buffer};
  const int mom = !has_momentum ? kPlain : (nesterov ? kNesterov : kHeavyBall);
  const Criterion crit = parse_criterion(std::string(criterion));
  const int64_t conflicting = CPL_DISPATCH_PARAM_TYPES(param.scalar_type(), op, [&] {
    const SgdArgs<scalar_t> a{param.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), buf,
                              code_words, h};
    return dispatch_rule(code_words != nullptr, crit, strict, [&]<int kRule>() {
      // Weight decay as a runtime test inside the element kept the code-word loop from running
      // at speed (16M fp32, SGD with codes, 2 idle cores: 22 ms vs 9 ms without codes).
      const auto with = [&]<bool kDecay>() {
        switch (mom) {
          case kHeavyBall: return sgd_step<scalar_t, kRule, kHeavyBall, kDecay>(a, n);
          case kNesterov: return sgd_step<scalar_t, kRule, kNesterov, kDecay>(a, n);
          default: return sgd_step<scalar_t, kRule, kPlain, kDecay>(a, n);
        }
      };
      return weight_decay != 0.0 ? with.template operator()<true>() : with.template operator()<false>();
    });
  });
  return count_tensor(conflicting);
}

}  // namespace cpu
}  // namespace cpl
