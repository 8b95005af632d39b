// Driver shared by the fused CPL steps: walks the elements one code word (16 elements) at a
// time in parallel, hands each element and its 2-bit reference code to the optimizer's update,
// and sums the conflicting count. One pass over memory: each byte of p, g, state and codes is
// read once and written at most once.
#pragma once

#include "common.h"

namespace cpl {
namespace cpu {

// `element(i, code)` updates element i and returns true when it conflicts with the reference.
template <bool kHasCodes, typename Element>
int64_t for_each_element(int64_t n, const uint32_t* codes, const Element& element) {
  const int64_t words = ceil_div(n, kCodesPerWord);
  return at::parallel_reduce(
      0, words, kGrainElements / kCodesPerWord, int64_t{0},
      [&](int64_t w0, int64_t w1, int64_t acc) {
        for (int64_t w = w0; w < w1; ++w) {
          const uint32_t word = kHasCodes ? codes[w] : 0u;
          const int64_t base = w * kCodesPerWord;
          const int64_t len = std::min<int64_t>(kCodesPerWord, n - base);
          int64_t conflicting = 0;
          // Fixed trip count of 16 on full words lets the compiler unroll and vectorise.
          if (len == kCodesPerWord) {
            for (int64_t k = 0; k < kCodesPerWord; ++k)
              conflicting += element(base + k, (word >> (2 * k)) & 3u);
          } else {
            for (int64_t k = 0; k < len; ++k) conflicting += element(base + k, (word >> (2 * k)) & 3u);
          }
          acc += conflicting;
        }
        return acc;
      },
      [](int64_t a, int64_t b) { return a + b; });
}

// Calls `body.template operator()<kHasCodes, kGradientCriterion>()` with the runtime flags
// turned into template arguments, so the per-element loop carries no flag tests.
template <typename Body>
int64_t dispatch_rule(bool has_codes, Criterion criterion, const Body& body) {
  const bool gradient = criterion == Criterion::kGradient;
  if (!has_codes) return body.template operator()<false, false>();
  return gradient ? body.template operator()<true, true>() : body.template operator()<true, false>();
}

inline at::Tensor count_tensor(int64_t count) { return at::scalar_tensor(count, at::kLong); }

inline const uint32_t* codes_ptr(const std::optional<at::Tensor>& codes, int64_t n, const char* op) {
  if (!codes.has_value()) return nullptr;
  check_exact(*codes, op, "codes", at::kInt, ceil_div(n, kCodesPerWord));
  return reinterpret_cast<const uint32_t*>(codes->const_data_ptr<int32_t>());
}

}  // namespace cpu
}  // namespace cpl
