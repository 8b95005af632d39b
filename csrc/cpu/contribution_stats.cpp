// contribution_stats(_codes): counts and fp64 sums of the elementwise products a*b, optional
// packed collaborative mask. Partial results are formed per fixed-size chunk and summed in
// chunk order, so the fp64 sums do not depend on the thread count. The per-word loops are
// vectorised (the sums within a chunk are formed in vector lanes, a different but fixed order)
// and compiled for baseline x86-64 and AVX2, picked at run time.
#include <vector>

#include "common.h"
#include "simd.h"

namespace cpl {
namespace cpu {

namespace {

struct Partial {
  int64_t pos = 0, neg = 0, zero = 0;
  double pos_sum = 0.0, neg_sum = 0.0;
};

constexpr int64_t kChunk = kGrainElements;  // multiple of 32: chunks never split a mask word

// Products of element pairs, fp64 (exact for fp32 inputs), 32 at a time (one mask word).
template <typename T>
struct PairProducts {
  const T* a;
  const T* b;
  CPL_INLINE void operator()(int64_t base, int64_t len, double* x) const {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) x[k] = static_cast<double>(to_f32(a[base + k])) * to_f32(b[base + k]);
  }
};

// b given as sign codes: a * {+1, -1, 0}, the signs expanded through the table of simd.h.
template <typename T>
struct CodeProducts {
  const T* a;
  const uint32_t* codes;
  int64_t n;
  CPL_INLINE void operator()(int64_t base, int64_t len, double* x) const {
    alignas(64) float s[32];
    expand_signs(codes[base / kCodesPerWord], s);
    if (base + kCodesPerWord < n) expand_signs(codes[base / kCodesPerWord + 1], s + 16);
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) x[k] = static_cast<double>(to_f32(a[base + k])) * s[k];
  }
};

// Elements [begin, end) of one chunk: counts, sums and mask words, vectorised per 32 elements.
template <typename Products>
CPL_INLINE Partial chunk_stats(const Products& product, int64_t begin, int64_t end, uint32_t* mask) {
  Partial acc;
  int64_t pos = 0, neg = 0;
  double pos_sum = 0.0, neg_sum = 0.0;
  for (int64_t w = begin / kBitsPerWord; w * kBitsPerWord < end; ++w) {
    const int64_t base = w * kBitsPerWord;
    const int64_t len = std::min<int64_t>(kBitsPerWord, end - base);
    alignas(64) double x[kBitsPerWord];
    product(base, len, x);
    uint32_t bits = 0;
#pragma omp simd reduction(+ : pos, neg, pos_sum, neg_sum) reduction(| : bits)
    for (int64_t k = 0; k < len; ++k) {
      const double xk = x[k] != x[k] ? 0.0 : x[k];  // a NaN product counts as zero
      const bool is_pos = xk > 0.0, is_neg = xk < 0.0;
      pos += is_pos;
      neg += is_neg;
      pos_sum += is_pos ? xk : 0.0;
      neg_sum += is_neg ? xk : 0.0;
      bits |= is_neg ? 0u : kBits.bit[k];
    }
    if (mask) mask[w] = bits;
  }
  acc.pos = pos, acc.neg = neg, acc.pos_sum = pos_sum, acc.neg_sum = neg_sum;
  acc.zero = (end - begin) - acc.pos - acc.neg;
  return acc;
}

template <typename Products>
Partial chunk_stats_base(const Products& product, int64_t begin, int64_t end, uint32_t* mask) {
  return chunk_stats(product, begin, end, mask);
}

template <typename Products>
CPL_TARGET_AVX2 Partial chunk_stats_avx2(const Products& product, int64_t begin, int64_t end, uint32_t* mask) {
  return chunk_stats(product, begin, end, mask);
}

template <typename Products>
std::tuple<at::Tensor, at::Tensor> reduce_products(int64_t n, uint32_t* mask, const Products& product) {
  const int64_t chunks = ceil_div(n, kChunk);
  std::vector<Partial> partial(chunks);
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
      partial[c] = avx2 ? chunk_stats_avx2(product, begin, end, mask) : chunk_stats_base(product, begin, end, mask);
    }
  });
  Partial total;
  for (const Partial& p : partial) {
    total.pos += p.pos, total.neg += p.neg, total.zero += p.zero;
    total.pos_sum += p.pos_sum, total.neg_sum += p.neg_sum;
  }
  at::Tensor counts = at::empty({3}, at::kLong);
  at::Tensor sums = at::empty({2}, at::kDouble);
  auto* cp = counts.data_ptr<int64_t>();
  cp[0] = total.pos, cp[1] = total.neg, cp[2] = total.zero;
  auto* sp = sums.data_ptr<double>();
  sp[0] = total.pos_sum, sp[1] = total.neg_sum;
  return {counts, sums};
}

uint32_t* mask_ptr(const std::optional<at::Tensor>& mask_out, int64_t n, const char* op) {
  if (!mask_out.has_value()) return nullptr;
  check_exact(*mask_out, op, "mask_out", at::kInt, ceil_div(n, kBitsPerWord));
  return reinterpret_cast<uint32_t*>(mask_out->mutable_data_ptr<int32_t>());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> contribution_stats(const at::Tensor& a, const at::Tensor& b,
                                                      const std::optional<at::Tensor>& mask_out) {
  const char* op = "contribution_stats";
  check_float_param(a, op, "a");
  check_float_param(b, op, "b");
  TORCH_CHECK(b.numel() == a.numel(), "cpl.", op, ": argument 'b' has ", b.numel(),
              " elements, 'a' has ", a.numel());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "cpl.", op, ": 'a' and 'b' must share a dtype");
  const int64_t n = a.numel();
  uint32_t* mask = mask_ptr(mask_out, n, op);
  return CPL_DISPATCH_PARAM_TYPES(a.scalar_type(), op, [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    return reduce_products(n, mask, PairProducts<scalar_t>{pa, pb});
  });
}

std::tuple<at::Tensor, at::Tensor> contribution_stats_codes(const at::Tensor& a, const at::Tensor& codes,
                                                            const std::optional<at::Tensor>& mask_out) {
  const char* op = "contribution_stats_codes";
  check_float_param(a, op, "a");
  const int64_t n = a.numel();
  check_exact(codes, op, "codes", at::kInt, ceil_div(n, kCodesPerWord));
  uint32_t* mask = mask_ptr(mask_out, n, op);
  const uint32_t* pc = reinterpret_cast<const uint32_t*>(codes.const_data_ptr<int32_t>());
  return CPL_DISPATCH_PARAM_TYPES(a.scalar_type(), op, [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    return reduce_products(n, mask, CodeProducts<scalar_t>{pa, pc, n});
  });
}

}  // namespace cpu
}  // namespace cpl
