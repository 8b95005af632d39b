// Fused CPL SGD (+ momentum, dampening, Nesterov, L2 weight decay) step, as torch.optim.SGD.
#include "cpl_step.h"

namespace cpl {
namespace cpu {

namespace {

struct SgdHyper {
  float lr, momentum, one_minus_dampening, weight_decay;
  bool has_momentum, nesterov, init_buffer, strict;
};

template <typename T, bool kHasCodes, bool kGradient>
int64_t sgd_step(T* param, const T* grad, float* buf, const uint32_t* codes, int64_t n, const SgdHyper h) {
  return for_each_element<kHasCodes>(n, codes, [&](int64_t i, uint32_t code) -> int64_t {
    const float p = load(param, i);
    float g = load(grad, i);
    if (h.weight_decay != 0.f) g += h.weight_decay * p;
    bool conflicting = false;
    if (kGradient) {
      conflicting = conflicts(g, code);
      g = conflicting ? 0.f : g;
    }
    float u = g;
    if (h.has_momentum) {
      // torch.optim.SGD: the buffer starts as the first gradient, undamped.
      const float b = h.init_buffer ? g : buf[i] * h.momentum + h.one_minus_dampening * g;
      buf[i] = b;
      u = h.nesterov ? g + h.momentum * b : b;
    }
    if (kHasCodes && !kGradient) conflicting = conflicts(u, code);
    const bool apply = !conflicting || (kGradient && !h.strict);
    store(param, i, apply ? p - h.lr * u : p);
    return conflicting;
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
  const SgdHyper h{static_cast<float>(lr), static_cast<float>(momentum),
                   static_cast<float>(1.0 - dampening), static_cast<float>(weight_decay),
                   has_momentum, nesterov, init_buffer, strict};
  const int64_t conflicting = CPL_DISPATCH_PARAM_TYPES(param.scalar_type(), op, [&] {
    scalar_t* p = param.mutable_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    return dispatch_rule(code_words != nullptr, parse_criterion(std::string(criterion)),
                         [&]<bool kHasCodes, bool kGradient>() {
                           return sgd_step<scalar_t, kHasCodes, kGradient>(p, g, buf, code_words, n, h);
                         });
  });
  return count_tensor(conflicting);
}

}  // namespace cpu
}  // namespace cpl
