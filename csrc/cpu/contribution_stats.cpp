// contribution_stats(_codes): counts and fp64 sums of the elementwise products a*b, optional
// packed collaborative mask. Partial results are formed per fixed-size chunk and summed in
// chunk order, so the fp64 sums do not depend on the thread count.
#include <vector>

#include "common.h"

namespace cpl {
namespace cpu {

namespace {

struct Partial {
  int64_t pos = 0, neg = 0, zero = 0;
  double pos_sum = 0.0, neg_sum = 0.0;
};

constexpr int64_t kChunk = kGrainElements;  // multiple of 32: chunks never split a mask word

// `product(i)` gives the fp64 product for element i (exact for fp32 inputs).
template <typename Product>
std::tuple<at::Tensor, at::Tensor> reduce_products(int64_t n, uint32_t* mask, Product product) {
  const int64_t chunks = ceil_div(n, kChunk);
  std::vector<Partial> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      Partial acc;
      const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
      for (int64_t w = begin / kBitsPerWord; w * kBitsPerWord < end; ++w) {
        const int64_t base = w * kBitsPerWord;
        const int64_t len = std::min<int64_t>(kBitsPerWord, end - base);
        uint32_t bits = 0;
        for (int64_t k = 0; k < len; ++k) {
          double x = product(base + k);
          if (x != x) x = 0.0;  // a NaN product counts as zero
          const bool is_pos = x > 0.0, is_neg = x < 0.0;
          acc.pos += is_pos;
          acc.neg += is_neg;
          acc.pos_sum += is_pos ? x : 0.0;
          acc.neg_sum += is_neg ? x : 0.0;
          bits |= static_cast<uint32_t>(!is_neg) << k;
        }
        if (mask) mask[w] = bits;
      }
      acc.zero = (end - begin) - acc.pos - acc.neg;
      partial[c] = acc;
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
    return reduce_products(n, mask, [=](int64_t i) {
      return static_cast<double>(load(pa, i)) * static_cast<double>(load(pb, i));
    });
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
    return reduce_products(n, mask, [=](int64_t i) {
      const uint32_t code = (pc[i / kCodesPerWord] >> (2 * (i % kCodesPerWord))) & 3u;
      const double s = code == kCodePos ? 1.0 : (code == kCodeNeg ? -1.0 : 0.0);
      return static_cast<double>(load(pa, i)) * s;
    });
  });
}

}  // namespace cpu
}  // namespace cpl
