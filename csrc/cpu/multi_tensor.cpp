// CPU multi-tensor steps: the single-tensor kernels in a C++ loop, so a model step is one
// dispatcher call instead of one per tensor (measured on a 21-tensor, 527K-param model: the
// per-tensor Python + dispatch overhead was ~0.06 ms a tensor, more than the kernels' work).
#include "common.h"
#include "ops.h"

namespace cpl {
namespace cpu {

namespace {

void check_list_size(size_t got, size_t want, const char* op, const char* name) {
  TORCH_CHECK(got == want, "cpl.", op, ": argument '", name, "' has ", got,
              " entries but 'params' has ", want);
}

double host_scalar(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.device().is_cpu(), "cpl.", op, ": argument '", name,
              "' must be a one-element CPU tensor");
  return t.item<double>();
}

std::optional<at::Tensor> entry(const c10::List<std::optional<at::Tensor>>& list, size_t i) {
  return list.get(i);
}

std::string item(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

// Every entry of every list is validated before the first tensor is stepped: the single-tensor
// op checks only its own arguments, so a bad entry k would otherwise raise after entries
// 0..k-1 were already written (docs/design.md section 3: an error leaves every tensor as it was).
void check_entry(const at::Tensor& param, const at::Tensor& grad, const at::Tensor* state1, const char* state1_list,
                 const at::Tensor* state2, const char* state2_list, const std::optional<at::Tensor>& codes,
                 size_t i, const char* op) {
  check_float_param(param, op, item("params", i).c_str());
  const int64_t n = param.numel();
  check_exact(grad, op, item("grads", i).c_str(), param.scalar_type(), n);
  if (state1) check_exact(*state1, op, item(state1_list, i).c_str(), at::kFloat, n);
  if (state2) check_exact(*state2, op, item(state2_list, i).c_str(), at::kFloat, n);
  if (codes.has_value()) check_exact(*codes, op, item("codes", i).c_str(), at::kInt, ceil_div(n, kCodesPerWord));
}

}  // namespace

at::Tensor cpl_adam_step_multi_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, const c10::List<std::optional<at::Tensor>>& codes,
                                const at::Tensor& step, const at::Tensor& lr, double beta1, double beta2,
                                double eps, double weight_decay, bool decoupled,
                                c10::string_view criterion, bool strict) {
  const char* op = "cpl_adam_step_multi_";
  const size_t n = params.size();
  check_list_size(grads.size(), n, op, "grads");
  check_list_size(exp_avgs.size(), n, op, "exp_avgs");
  check_list_size(exp_avg_sqs.size(), n, op, "exp_avg_sqs");
  check_list_size(codes.size(), n, op, "codes");
  const double step_value = host_scalar(step, op, "step"), lr_value = host_scalar(lr, op, "lr");
  TORCH_CHECK(step_value >= 1, "cpl.", op, ": argument 'step' counts from 1, got ", step_value);
  parse_criterion(std::string(criterion));
  for (size_t i = 0; i < n; ++i)
    check_entry(params[i], grads[i], &exp_avgs[i], "exp_avgs", &exp_avg_sqs[i], "exp_avg_sqs", entry(codes, i), i, op);
  at::Tensor counts = at::empty({static_cast<int64_t>(n)}, at::kLong);
  int64_t* out = counts.data_ptr<int64_t>();
  for (size_t i = 0; i < n; ++i) {
    out[i] = cpl_adam_step_(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], entry(codes, i),
                            step_value, lr_value, beta1, beta2, eps, weight_decay, decoupled,
                            criterion, strict)
                 .item<int64_t>();
  }
  return counts;
}

at::Tensor cpl_sgd_step_multi_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                               const c10::List<std::optional<at::Tensor>>& codes, const at::Tensor& lr,
                               double momentum, double dampening, double weight_decay, bool nesterov,
                               bool init_buffer, c10::string_view criterion, bool strict) {
  const char* op = "cpl_sgd_step_multi_";
  const size_t n = params.size();
  check_list_size(grads.size(), n, op, "grads");
  check_list_size(codes.size(), n, op, "codes");
  const bool has_momentum = momentum != 0.0;
  if (has_momentum) check_list_size(momentum_buffers.size(), n, op, "momentum_buffers");
  const double lr_value = host_scalar(lr, op, "lr");
  parse_criterion(std::string(criterion));
  for (size_t i = 0; i < n; ++i)
    check_entry(params[i], grads[i], has_momentum ? &momentum_buffers[i] : nullptr, "momentum_buffers", nullptr,
                nullptr, entry(codes, i), i, op);
  at::Tensor counts = at::empty({static_cast<int64_t>(n)}, at::kLong);
  int64_t* out = counts.data_ptr<int64_t>();
  for (size_t i = 0; i < n; ++i) {
    std::optional<at::Tensor> buf;
    if (has_momentum) buf = momentum_buffers[i];
    out[i] = cpl_sgd_step_(params[i], grads[i], buf, entry(codes, i), lr_value, momentum, dampening,
                           weight_decay, nesterov, init_buffer, criterion, strict)
                 .item<int64_t>();
  }
  return counts;
}

}  // namespace cpu
}  // namespace cpl
