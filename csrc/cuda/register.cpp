// Torch glue for the CUDA kernels: validates CUDA tensors, fills the params structs of
// kernels.cuh and launches on the current stream. Schemas live in csrc/ops.cpp.
#include <cmath>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels.cuh"

namespace {

using at::Tensor;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "cpl.", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cpl_cuda::DType param_dtype(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return cpl_cuda::DType::kFloat32;
    case at::kBFloat16: return cpl_cuda::DType::kBFloat16;
    case at::kHalf: return cpl_cuda::DType::kFloat16;
    default: TORCH_CHECK(false, "cpl.", op, ": argument '", name, "' has dtype ", t.scalar_type(),
                         "; expected float32, bfloat16 or float16");
  }
}

void check_cuda(const Tensor& t, const Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "cpl.", op, ": argument '", name, "' must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "cpl.", op, ": argument '", name, "' is on ", t.device(),
              " but the other inputs are on ", like.device());
  TORCH_CHECK(t.is_contiguous(), "cpl.", op, ": argument '", name, "' must be contiguous");
}

void check_tensor(const Tensor& t, const Tensor& like, const char* op, const char* name,
                  at::ScalarType dtype, int64_t numel) {
  check_cuda(t, like, op, name);
  TORCH_CHECK(t.scalar_type() == dtype, "cpl.", op, ": argument '", name, "' has dtype ", t.scalar_type(),
              "; expected ", dtype);
  TORCH_CHECK(t.numel() == numel, "cpl.", op, ": argument '", name, "' has ", t.numel(),
              " elements; expected ", numel);
}

int64_t code_words(int64_t n) { return (n + 15) / 16; }
int64_t mask_words(int64_t n) { return (n + 31) / 32; }

cpl_cuda::Criterion parse_criterion(c10::string_view c, const char* op) {
  if (c == "update") return cpl_cuda::Criterion::kUpdate;
  if (c == "gradient") return cpl_cuda::Criterion::kGradient;
  TORCH_CHECK(false, "cpl.", op, ": argument 'criterion' must be 'update' or 'gradient', got '", std::string(c), "'");
}

void check_param_grad(const Tensor& param, const Tensor& grad, const char* op) {
  check_cuda(param, param, op, "param");
  param_dtype(param, op, "param");
  check_tensor(grad, param, op, "grad", param.scalar_type(), param.numel());
}

cpl_cuda::AdamHyper adam_hyper(double step, double lr, double beta1, double beta2, double eps,
                               double weight_decay, bool decoupled, cpl_cuda::Criterion criterion, bool strict) {
  cpl_cuda::AdamHyper h;
  h.lr = static_cast<float>(lr);
  h.beta1 = static_cast<float>(beta1);
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.weight_decay = static_cast<float>(weight_decay);
  // In double, as the reference computes them in Python, then rounded once.
  h.bias_correction1 = static_cast<float>(1.0 - std::pow(beta1, step));
  h.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
  h.decoupled = decoupled;
  h.criterion = criterion;
  h.strict = strict;
  return h;
}

void pack_signs_cuda(const Tensor& src, const Tensor& codes) {
  const char* op = "pack_signs_";
  check_cuda(src, src, op, "src");
  check_tensor(codes, src, op, "codes", at::kInt, code_words(src.numel()));
  const c10::cuda::CUDAGuard guard(src.device());
  cpl_cuda::PackSignsParams p{src.data_ptr(), param_dtype(src, op, "src"), codes.data_ptr<int32_t>(), src.numel()};
  check_launch(cpl_cuda::launch_pack_signs(p, c10::cuda::getCurrentCUDAStream()), op);
}

std::tuple<Tensor, Tensor> stats_cuda(const Tensor& a, const Tensor* b, const Tensor* codes,
                                      const std::optional<Tensor>& mask_out, const char* op) {
  check_cuda(a, a, op, "a");
  const auto dtype = param_dtype(a, op, "a");
  const int64_t n = a.numel();
  if (b) check_tensor(*b, a, op, "b", a.scalar_type(), n);
  if (codes) check_tensor(*codes, a, op, "codes", at::kInt, code_words(n));
  if (mask_out) check_tensor(*mask_out, a, op, "mask_out", at::kInt, mask_words(n));
  const c10::cuda::CUDAGuard guard(a.device());
  Tensor counts = at::zeros({3}, a.options().dtype(at::kLong));
  Tensor sums = at::zeros({2}, a.options().dtype(at::kDouble));
  cpl_cuda::StatsParams p;
  p.a = a.data_ptr();
  p.b = b ? b->data_ptr() : nullptr;
  p.b_codes = codes ? codes->data_ptr<int32_t>() : nullptr;
  p.dtype = dtype;
  p.mask_out = mask_out ? mask_out->data_ptr<int32_t>() : nullptr;
  p.numel = n;
  p.counts = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  p.sums = sums.data_ptr<double>();
  check_launch(cpl_cuda::launch_contribution_stats(p, c10::cuda::getCurrentCUDAStream()), op);
  return {counts, sums};
}

std::tuple<Tensor, Tensor> contribution_stats_cuda(const Tensor& a, const Tensor& b, const std::optional<Tensor>& mask_out) {
  return stats_cuda(a, &b, nullptr, mask_out, "contribution_stats");
}

std::tuple<Tensor, Tensor> contribution_stats_codes_cuda(const Tensor& a, const Tensor& codes,
                                                         const std::optional<Tensor>& mask_out) {
  return stats_cuda(a, nullptr, &codes, mask_out, "contribution_stats_codes");
}

Tensor cpl_adam_step_cuda(const Tensor& param, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq,
                          const std::optional<Tensor>& codes, double step, double lr, double beta1, double beta2,
                          double eps, double weight_decay, bool decoupled, c10::string_view criterion, bool strict) {
  const char* op = "cpl_adam_step_";
  check_param_grad(param, grad, op);
  const int64_t n = param.numel();
  check_tensor(exp_avg, param, op, "exp_avg", at::kFloat, n);
  check_tensor(exp_avg_sq, param, op, "exp_avg_sq", at::kFloat, n);
  if (codes) check_tensor(*codes, param, op, "codes", at::kInt, code_words(n));
  const c10::cuda::CUDAGuard guard(param.device());
  Tensor conflicting = at::zeros({}, param.options().dtype(at::kLong));
  cpl_cuda::AdamParams p;
  p.param = param.data_ptr();
  p.grad = grad.data_ptr();
  p.exp_avg = exp_avg.data_ptr<float>();
  p.exp_avg_sq = exp_avg_sq.data_ptr<float>();
  p.codes = codes ? codes->data_ptr<int32_t>() : nullptr;
  p.dtype = param_dtype(param, op, "param");
  p.numel = n;
  p.hyper = adam_hyper(step, lr, beta1, beta2, eps, weight_decay, decoupled, parse_criterion(criterion, op), strict);
  p.conflicting = reinterpret_cast<unsigned long long*>(conflicting.data_ptr<int64_t>());
  check_launch(cpl_cuda::launch_cpl_adam_step(p, c10::cuda::getCurrentCUDAStream()), op);
  return conflicting;
}

Tensor cpl_sgd_step_cuda(const Tensor& param, const Tensor& grad, const std::optional<Tensor>& momentum_buffer,
                         const std::optional<Tensor>& codes, double lr, double momentum, double dampening,
                         double weight_decay, bool nesterov, bool init_buffer, c10::string_view criterion, bool strict) {
  const char* op = "cpl_sgd_step_";
  check_param_grad(param, grad, op);
  const int64_t n = param.numel();
  TORCH_CHECK(momentum == 0.0 || momentum_buffer.has_value(), "cpl.", op,
              ": argument 'momentum_buffer' is required when momentum != 0");
  if (momentum != 0.0) check_tensor(*momentum_buffer, param, op, "momentum_buffer", at::kFloat, n);
  if (codes) check_tensor(*codes, param, op, "codes", at::kInt, code_words(n));
  const c10::cuda::CUDAGuard guard(param.device());
  Tensor conflicting = at::zeros({}, param.options().dtype(at::kLong));
  cpl_cuda::SgdParams p;
  p.param = param.data_ptr();
  p.grad = grad.data_ptr();
  p.momentum_buffer = momentum != 0.0 ? momentum_buffer->data_ptr<float>() : nullptr;
  p.codes = codes ? codes->data_ptr<int32_t>() : nullptr;
  p.dtype = param_dtype(param, op, "param");
  p.numel = n;
  p.hyper.lr = static_cast<float>(lr);
  p.hyper.momentum = static_cast<float>(momentum);
  p.hyper.one_minus_dampening = static_cast<float>(1.0 - dampening);
  p.hyper.weight_decay = static_cast<float>(weight_decay);
  p.hyper.nesterov = nesterov;
  p.hyper.init_buffer = init_buffer;
  p.hyper.criterion = parse_criterion(criterion, op);
  p.hyper.strict = strict;
  p.conflicting = reinterpret_cast<unsigned long long*>(conflicting.data_ptr<int64_t>());
  check_launch(cpl_cuda::launch_cpl_sgd_step(p, c10::cuda::getCurrentCUDAStream()), op);
  return conflicting;
}

void masked_adamw_step_cuda(const Tensor& param, const Tensor& grad, const Tensor& mask, const Tensor& block_offsets,
                            const Tensor& exp_avg, const Tensor& exp_avg_sq, double step, double lr, double beta1,
                            double beta2, double eps, double weight_decay) {
  const char* op = "masked_adamw_step_";
  check_param_grad(param, grad, op);
  const int64_t n = param.numel();
  check_tensor(mask, param, op, "mask_words", at::kInt, mask_words(n));
  check_tensor(block_offsets, param, op, "block_offsets", at::kLong, (n + 1023) / 1024);
  check_tensor(exp_avg, param, op, "exp_avg", at::kFloat, exp_avg.numel());
  check_tensor(exp_avg_sq, param, op, "exp_avg_sq", at::kFloat, exp_avg.numel());
  TORCH_CHECK(exp_avg.numel() <= n, "cpl.", op, ": argument 'exp_avg' has more entries than 'param' has elements");
  const c10::cuda::CUDAGuard guard(param.device());
  cpl_cuda::MaskedAdamWParams p;
  p.param = param.data_ptr();
  p.grad = grad.data_ptr();
  p.mask_words = mask.data_ptr<int32_t>();
  p.block_offsets = block_offsets.data_ptr<int64_t>();
  p.exp_avg = exp_avg.data_ptr<float>();
  p.exp_avg_sq = exp_avg_sq.data_ptr<float>();
  p.dtype = param_dtype(param, op, "param");
  p.numel = n;
  p.hyper = adam_hyper(step, lr, beta1, beta2, eps, weight_decay, true, cpl_cuda::Criterion::kUpdate, true);
  check_launch(cpl_cuda::launch_masked_adamw_step(p, c10::cuda::getCurrentCUDAStream()), op);
}

// ---- multi-tensor ---------------------------------------------------------------------------

// Host-side columns of one dtype group; pointers stay valid while the caller's tensors live.
struct Group {
  std::vector<void*> params;
  std::vector<const void*> grads;
  std::vector<float*> state1, state2;
  std::vector<const int32_t*> codes;
  std::vector<int64_t> numels, slots;
};

Tensor device_scalar(const Tensor& t, const Tensor& like, const char* op, const char* name) {
  check_cuda(t, like, op, name);
  TORCH_CHECK(t.numel() == 1, "cpl.", op, ": argument '", name, "' must hold one value, got ", t.numel());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) || at::isIntegralType(t.scalar_type(), false), "cpl.", op,
              ": argument '", name, "' must be a real number tensor");
  return t.reshape({}).to(at::kDouble);  // device-side cast: stays capturable in a CUDA graph
}

std::vector<Group> group_by_dtype(at::TensorList params, at::TensorList grads, at::TensorList state1,
                                  at::TensorList state2, const c10::List<std::optional<Tensor>>& codes,
                                  const char* op) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, "cpl.", op, ": 'grads' has ", grads.size(), " tensors, 'params' ", n);
  TORCH_CHECK(state1.empty() || static_cast<int64_t>(state1.size()) == n, "cpl.", op, ": state list length mismatch");
  TORCH_CHECK(state2.empty() || static_cast<int64_t>(state2.size()) == n, "cpl.", op, ": state list length mismatch");
  TORCH_CHECK(codes.size() == 0 || static_cast<int64_t>(codes.size()) == n, "cpl.", op, ": 'codes' has ",
              codes.size(), " entries, 'params' ", n);
  std::vector<Group> groups(3);
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    check_param_grad(p, grads[i], op);
    const int64_t numel = p.numel();
    Group& g = groups[static_cast<int>(param_dtype(p, op, "params"))];
    g.params.push_back(p.data_ptr());
    g.grads.push_back(grads[i].data_ptr());
    if (!state1.empty()) {
      check_tensor(state1[i], p, op, "state", at::kFloat, numel);
      g.state1.push_back(state1[i].data_ptr<float>());
    }
    if (!state2.empty()) {
      check_tensor(state2[i], p, op, "exp_avg_sq", at::kFloat, numel);
      g.state2.push_back(state2[i].data_ptr<float>());
    }
    const int32_t* c = nullptr;
    if (codes.size() > 0) {
      const std::optional<Tensor> ci = codes.get(i);
      if (ci.has_value()) {
        check_tensor(*ci, p, op, "codes", at::kInt, code_words(numel));
        c = ci->data_ptr<int32_t>();
      }
    }
    g.codes.push_back(c);
    g.numels.push_back(numel);
    g.slots.push_back(i);
  }
  return groups;
}

Tensor cpl_adam_step_multi_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, const c10::List<std::optional<Tensor>>& codes,
                                const Tensor& step, const Tensor& lr, double beta1, double beta2, double eps,
                                double weight_decay, bool decoupled, c10::string_view criterion, bool strict) {
  const char* op = "cpl_adam_step_multi_";
  TORCH_CHECK(!params.empty(), "cpl.", op, ": 'params' is empty");
  TORCH_CHECK(exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size(), "cpl.", op,
              ": 'exp_avgs' and 'exp_avg_sqs' need one tensor per param");
  const Tensor& first = params[0];
  const c10::cuda::CUDAGuard guard(first.device());
  const Tensor step_d = device_scalar(step, first, op, "step");
  const Tensor lr_d = device_scalar(lr, first, op, "lr");
  const auto crit = parse_criterion(criterion, op);
  std::vector<Group> groups = group_by_dtype(params, grads, exp_avgs, exp_avg_sqs, codes, op);
  Tensor counts = at::zeros({static_cast<int64_t>(params.size())}, first.options().dtype(at::kLong));
  for (int d = 0; d < 3; ++d) {
    Group& g = groups[d];
    if (g.params.empty()) continue;
    cpl_cuda::AdamMultiParams p;
    p.num_tensors = static_cast<int64_t>(g.params.size());
    p.params = g.params.data();
    p.grads = g.grads.data();
    p.exp_avgs = g.state1.data();
    p.exp_avg_sqs = g.state2.data();
    p.codes = g.codes.data();
    p.numels = g.numels.data();
    p.count_slots = g.slots.data();
    p.dtype = static_cast<cpl_cuda::DType>(d);
    p.step = step_d.data_ptr<double>();
    p.lr = lr_d.data_ptr<double>();
    p.beta1 = beta1;
    p.beta2 = beta2;
    p.eps = eps;
    p.weight_decay = weight_decay;
    p.decoupled = decoupled;
    p.criterion = crit;
    p.strict = strict;
    p.counts = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
    check_launch(cpl_cuda::launch_cpl_adam_step_multi(p, c10::cuda::getCurrentCUDAStream()), op);
  }
  return counts;
}

Tensor cpl_sgd_step_multi_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                               const c10::List<std::optional<Tensor>>& codes, const Tensor& lr, double momentum,
                               double dampening, double weight_decay, bool nesterov, bool init_buffer,
                               c10::string_view criterion, bool strict) {
  const char* op = "cpl_sgd_step_multi_";
  TORCH_CHECK(!params.empty(), "cpl.", op, ": 'params' is empty");
  TORCH_CHECK(momentum == 0.0 || momentum_buffers.size() == params.size(), "cpl.", op,
              ": 'momentum_buffers' needs one tensor per param when momentum != 0");
  const Tensor& first = params[0];
  const c10::cuda::CUDAGuard guard(first.device());
  const Tensor lr_d = device_scalar(lr, first, op, "lr");
  const auto crit = parse_criterion(criterion, op);
  std::vector<Group> groups = group_by_dtype(params, grads, momentum != 0.0 ? momentum_buffers : at::TensorList(),
                                             at::TensorList(), codes, op);
  Tensor counts = at::zeros({static_cast<int64_t>(params.size())}, first.options().dtype(at::kLong));
  for (int d = 0; d < 3; ++d) {
    Group& g = groups[d];
    if (g.params.empty()) continue;
    cpl_cuda::SgdMultiParams p;
    p.num_tensors = static_cast<int64_t>(g.params.size());
    p.params = g.params.data();
    p.grads = g.grads.data();
    p.momentum_buffers = momentum != 0.0 ? g.state1.data() : nullptr;
    p.codes = g.codes.data();
    p.numels = g.numels.data();
    p.count_slots = g.slots.data();
    p.dtype = static_cast<cpl_cuda::DType>(d);
    p.lr = lr_d.data_ptr<double>();
    p.momentum = static_cast<float>(momentum);
    p.one_minus_dampening = static_cast<float>(1.0 - dampening);
    p.weight_decay = static_cast<float>(weight_decay);
    p.nesterov = nesterov;
    p.init_buffer = init_buffer;
    p.criterion = crit;
    p.strict = strict;
    p.counts = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
    check_launch(cpl_cuda::launch_cpl_sgd_step_multi(p, c10::cuda::getCurrentCUDAStream()), op);
  }
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(cpl, CUDA, m) {
  m.impl("pack_signs_", &pack_signs_cuda);
  m.impl("contribution_stats", &contribution_stats_cuda);
  m.impl("contribution_stats_codes", &contribution_stats_codes_cuda);
  m.impl("cpl_adam_step_", &cpl_adam_step_cuda);
  m.impl("cpl_sgd_step_", &cpl_sgd_step_cuda);
  m.impl("masked_adamw_step_", &masked_adamw_step_cuda);
  m.impl("cpl_adam_step_multi_", &cpl_adam_step_multi_cuda);
  m.impl("cpl_sgd_step_multi_", &cpl_sgd_step_multi_cuda);
}
