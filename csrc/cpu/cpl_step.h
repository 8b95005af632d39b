// Driver shared by the fused CPL steps: splits the elements into full code words (16 elements)
// run in parallel by a vectorised kernel (adam_kernel.h, sgd_step.cpp) and a scalar tail, and
// sums the conflicting count. One pass over memory: each byte of p, g, state and codes is read
// once and written at most once.
#pragma once

#include "common.h"
#include "simd.h"

namespace cpl {
namespace cpu {

// Runs `words(w0, w1)` (a kernel over full 16-element code words, returning its conflicting
// count) in parallel over all full words, then `tail(i0)` on the last partial word, and sums.
template <typename Words, typename Tail>
int64_t run_words(int64_t n, const Words& words, const Tail& tail) {
  const int64_t full = n / kCodesPerWord;
  const int64_t count = at::parallel_reduce(
      0, full, kGrainElements / kCodesPerWord, int64_t{0},
      [&](int64_t w0, int64_t w1, int64_t acc) { return acc + words(w0, w1); },
      [](int64_t a, int64_t b) { return a + b; });
  return count + tail(full * kCodesPerWord);
}

// Calls `lane(i, sign)` (an always-inline element update returning 1 when element i conflicts)
// for every element of the full code words [w0, w1) and returns the conflicting count.
// Signs are expanded for a batch of 64 words (1024 lanes, 4 KiB: L1-resident) before one long
// simd loop: per word, the 16-lane loop's horizontal count reduction and the vector reload of
// freshly stored signs cost more than SGD's whole update (16M fp32 with codes, 2 idle cores:
// SGD+momentum 33 -> 17 ms, plain SGD 25 -> 11 ms, Adam 24 -> 20 ms with batching).
template <typename Lane>
CPL_INLINE int64_t for_coded_lanes(const uint32_t* __restrict codes, int64_t w0, int64_t w1, const Lane& lane) {
  constexpr int64_t kBatchWords = 64;
  alignas(64) float sign[kBatchWords * kCodesPerWord];
  int64_t total = 0;
  for (int64_t w = w0; w < w1; w += kBatchWords) {
    const int64_t words = std::min(kBatchWords, w1 - w);
    for (int64_t k = 0; k < words; ++k) expand_signs(codes[w + k], sign + kCodesPerWord * k);
    const int64_t base = w * kCodesPerWord, lanes = words * kCodesPerWord;
    int32_t count = 0;
#pragma omp simd reduction(+ : count)
    for (int64_t k = 0; k < lanes; ++k) count += lane(base + k, sign[k]);
    total += count;
  }
  return total;
}

// Calls `body.template operator()<kRule>()` (a Rule of simd.h) with the runtime choice turned
// into a template argument, so the per-element loop carries no flag tests.
template <typename Body>
int64_t dispatch_rule(bool has_codes, Criterion criterion, bool strict, const Body& body) {
  if (!has_codes) return body.template operator()<kNoReference>();
  if (criterion == Criterion::kUpdate) return body.template operator()<kUpdateRule>();
  return strict ? body.template operator()<kGradientStrict>() : body.template operator()<kGradientSoft>();
}

inline at::Tensor count_tensor(int64_t count) { return at::scalar_tensor(count, at::kLong); }

inline const uint32_t* codes_ptr(const std::optional<at::Tensor>& codes, int64_t n, const char* op) {
  if (!codes.has_value()) return nullptr;
  check_exact(*codes, op, "codes", at::kInt, ceil_div(n, kCodesPerWord));
  return reinterpret_cast<const uint32_t*>(codes->const_data_ptr<int32_t>());
}

}  // namespace cpu
}  // namespace cpl
