// The CPU implementation of every cpl:: op (schemas: csrc/ops.cpp), registered in register.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace cpl {
namespace cpu {
// The step engine (step.cpp): one fused CPL step of optimizer `kind` over lists of tensors.
at::Tensor cpl_step_(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                     const c10::List<std::optional<at::Tensor>>& codes, c10::string_view kind,
                     const at::Tensor& step, const at::Tensor& lr, at::ArrayRef<double> hyper,
                     c10::string_view criterion, bool strict, bool skip_nonfinite,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);
// The same with 8-bit blockwise state (engine.h Blockwise8; cpl_kernels/quant8.py).
at::Tensor cpl_step_8bit_(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList absmax1,
                          at::TensorList state2, at::TensorList absmax2, const at::Tensor& qmaps,
                          const c10::List<std::optional<at::Tensor>>& codes, c10::string_view kind,
                          const at::Tensor& step, const at::Tensor& lr, at::ArrayRef<double> hyper,
                          c10::string_view criterion, bool strict, bool skip_nonfinite,
                          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);
void pack_signs_(const at::Tensor& src, const at::Tensor& codes);
std::tuple<at::Tensor, at::Tensor> contribution_stats(const at::Tensor& a, const at::Tensor& b,
                                                      const std::optional<at::Tensor>& mask_out);
std::tuple<at::Tensor, at::Tensor> contribution_stats_codes(const at::Tensor& a, const at::Tensor& codes,
                                                            const std::optional<at::Tensor>& mask_out);
at::Tensor masked_adamw_step_(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& mask_words,
                              const at::Tensor& block_offsets, const at::Tensor& exp_avg,
                              const at::Tensor& exp_avg_sq, double step, double lr, double beta1, double beta2,
                              double eps, double weight_decay, bool skip_nonfinite,
                              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);
at::Tensor cpl_mask_words(const at::Tensor& a, const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& codes,
                          const at::Tensor& mask_out, const std::optional<at::Tensor>& block_offsets_out);
}  // namespace cpu
}  // namespace cpl

