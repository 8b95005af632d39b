// CPU implementations of the cpl:: ops declared in csrc/ops.cpp.
#include <torch/library.h>

#include "common.h"

namespace cpl {
namespace cpu {
void pack_signs_(const at::Tensor& src, const at::Tensor& codes);
std::tuple<at::Tensor, at::Tensor> contribution_stats(const at::Tensor& a, const at::Tensor& b,
                                                      const std::optional<at::Tensor>& mask_out);
std::tuple<at::Tensor, at::Tensor> contribution_stats_codes(const at::Tensor& a, const at::Tensor& codes,
                                                            const std::optional<at::Tensor>& mask_out);
at::Tensor cpl_adam_step_(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                          const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& codes,
                          double step, double lr, double beta1, double beta2, double eps,
                          double weight_decay, bool decoupled, c10::string_view criterion, bool strict);
at::Tensor cpl_sgd_step_(const at::Tensor& param, const at::Tensor& grad,
                         const std::optional<at::Tensor>& momentum_buffer,
                         const std::optional<at::Tensor>& codes, double lr, double momentum,
                         double dampening, double weight_decay, bool nesterov, bool init_buffer,
                         c10::string_view criterion, bool strict);
void masked_adamw_step_(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& mask_words,
                        const at::Tensor& block_offsets, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_sq, double step, double lr, double beta1,
                        double beta2, double eps, double weight_decay);
}  // namespace cpu
}  // namespace cpl

TORCH_LIBRARY_IMPL(cpl, CPU, m) {
  m.impl("pack_signs_", &cpl::cpu::pack_signs_);
  m.impl("contribution_stats", &cpl::cpu::contribution_stats);
  m.impl("contribution_stats_codes", &cpl::cpu::contribution_stats_codes);
  m.impl("cpl_adam_step_", &cpl::cpu::cpl_adam_step_);
  m.impl("cpl_sgd_step_", &cpl::cpu::cpl_sgd_step_);
  m.impl("masked_adamw_step_", &cpl::cpu::masked_adamw_step_);
}
