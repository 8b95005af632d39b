// Fused CPL Adam / AdamW step (DESIGN.md section 1), fp32 math whatever the param dtype.
#include <cmath>

#include "cpl_step.h"

namespace cpl {
namespace cpu {

namespace {

struct AdamHyper {
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction1, bias_correction2_sqrt,
      eps, weight_decay;
  bool l2;         // Adam: weight decay added to the gradient
  bool decoupled;  // AdamW: weight decay added to the update direction
  bool strict;
};

template <typename T, bool kHasCodes, bool kGradient>
int64_t adam_step(T* param, const T* grad, float* m, float* v, const uint32_t* codes, int64_t n,
                  const AdamHyper h) {
  return for_each_element<kHasCodes>(n, codes, [&](int64_t i, uint32_t code) -> int64_t {
    const float p = load(param, i);
    float g = load(grad, i);
    if (h.l2) g += h.weight_decay * p;
    bool conflicting = false;
    if (kGradient) {
      conflicting = conflicts(g, code);
      g = conflicting ? 0.f : g;  // the state only ever sees collaborative gradient
    }
    const float mi = m[i] * h.beta1 + h.one_minus_beta1 * g;
    const float vi = v[i] * h.beta2 + h.one_minus_beta2 * g * g;
    m[i] = mi;
    v[i] = vi;
    float u = (mi / h.bias_correction1) / (std::sqrt(vi) / h.bias_correction2_sqrt + h.eps);
    if (h.decoupled) u += h.weight_decay * p;
    if (kHasCodes && !kGradient) conflicting = conflicts(u, code);
    const bool apply = !conflicting || (kGradient && !h.strict);
    store(param, i, apply ? p - h.lr * u : p);
    return conflicting;
  });
}

}  // namespace

at::Tensor cpl_adam_step_(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                          const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& codes,
                          double step, double lr, double beta1, double beta2, double eps,
                          double weight_decay, bool decoupled, c10::string_view criterion, bool strict) {
  const char* op = "cpl_adam_step_";
  check_float_param(param, op, "param");
  const int64_t n = param.numel();
  check_exact(grad, op, "grad", param.scalar_type(), n);
  check_exact(exp_avg, op, "exp_avg", at::kFloat, n);
  check_exact(exp_avg_sq, op, "exp_avg_sq", at::kFloat, n);
  TORCH_CHECK(step >= 1, "cpl.", op, ": argument 'step' counts from 1, got ", step);
  const uint32_t* code_words = codes_ptr(codes, n, op);
  const AdamHyper h{static_cast<float>(lr),
                    static_cast<float>(beta1),
                    static_cast<float>(beta2),
                    static_cast<float>(1.0 - beta1),
                    static_cast<float>(1.0 - beta2),
                    static_cast<float>(1.0 - std::pow(beta1, step)),
                    static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step))),
                    static_cast<float>(eps),
                    static_cast<float>(weight_decay),
                    !decoupled && weight_decay != 0.0,
                    decoupled && weight_decay != 0.0,
                    strict};
  float* m = exp_avg.mutable_data_ptr<float>();
  float* v = exp_avg_sq.mutable_data_ptr<float>();
  const int64_t conflicting = CPL_DISPATCH_PARAM_TYPES(param.scalar_type(), op, [&] {
    scalar_t* p = param.mutable_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    return dispatch_rule(code_words != nullptr, parse_criterion(std::string(criterion)),
                         [&]<bool kHasCodes, bool kGradient>() {
                           return adam_step<scalar_t, kHasCodes, kGradient>(p, g, m, v, code_words, n, h);
                         });
  });
  return count_tensor(conflicting);
}

}  // namespace cpu
}  // namespace cpl
