// Compact-state AdamW: m and v exist only for active elements (DESIGN.md section 1).
// Storage invariant: block_offsets[b] = active elements before element b*1024, and exp_avg /
// exp_avg_sq hold one entry per active element in element order, so the compact index of an
// active element is block_offsets[b] + (active bits before it within its block).
#include <cmath>

#include "common.h"

namespace cpl {
namespace cpu {

void masked_adamw_step_(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& mask_words,
                        const at::Tensor& block_offsets, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_sq, double step, double lr, double beta1,
                        double beta2, double eps, double weight_decay) {
  const char* op = "masked_adamw_step_";
  check_float_param(param, op, "param");
  const int64_t n = param.numel();
  check_exact(grad, op, "grad", param.scalar_type(), n);
  check_exact(mask_words, op, "mask_words", at::kInt, ceil_div(n, kBitsPerWord));
  const int64_t blocks = ceil_div(n, kOffsetBlock);
  check_exact(block_offsets, op, "block_offsets", at::kLong, blocks);
  const int64_t active = exp_avg.numel();
  check_exact(exp_avg, op, "exp_avg", at::kFloat, active);
  check_exact(exp_avg_sq, op, "exp_avg_sq", at::kFloat, active);
  TORCH_CHECK(step >= 1, "cpl.", op, ": argument 'step' counts from 1, got ", step);

  const uint32_t* mask = reinterpret_cast<const uint32_t*>(mask_words.const_data_ptr<int32_t>());
  const int64_t* offsets = block_offsets.const_data_ptr<int64_t>();
  float* m = exp_avg.mutable_data_ptr<float>();
  float* v = exp_avg_sq.mutable_data_ptr<float>();
  const float flr = lr, b1 = beta1, b2 = beta2, omb1 = 1.0 - beta1, omb2 = 1.0 - beta2;
  const float bc1 = 1.0 - std::pow(beta1, step), bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, step));
  const float feps = eps, wd = weight_decay;
  const int64_t words = ceil_div(n, kBitsPerWord);

  CPL_DISPATCH_PARAM_TYPES(param.scalar_type(), op, [&] {
    scalar_t* p = param.mutable_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainElements / kOffsetBlock), [&](int64_t b0, int64_t b1_) {
      for (int64_t b = b0; b < b1_; ++b) {
        int64_t j = offsets[b];
        const int64_t w_end = std::min(words, (b + 1) * (kOffsetBlock / kBitsPerWord));
        for (int64_t w = b * (kOffsetBlock / kBitsPerWord); w < w_end; ++w) {
          // Visit only the set bits: frozen elements cost no state and no arithmetic.
          for (uint32_t bits = mask[w]; bits != 0; bits &= bits - 1, ++j) {
            const int64_t i = w * kBitsPerWord + __builtin_ctz(bits);
            TORCH_CHECK(j < active && i < n, "cpl.", op, ": mask has more active elements than 'exp_avg' holds (",
                        active, "); rebuild the compact state from the mask");
            const float pi = load(p, i), gi = load(g, i);
            const float mi = m[j] * b1 + omb1 * gi;
            const float vi = v[j] * b2 + omb2 * gi * gi;
            m[j] = mi;
            v[j] = vi;
            const float u = (mi / bc1) / (std::sqrt(vi) / bc2_sqrt + feps) + wd * pi;
            store(p, i, pi - flr * u);
          }
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace cpl
