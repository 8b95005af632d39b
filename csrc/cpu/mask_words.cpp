// cpl_mask_words: the CPL mask of one parameter written straight into its bits (contract:
// cpl_kernels/reference.py cpl_mask_words). Bit i is 1 (collaborative) unless a_i * r_i < 0 on
// signs, r = b or b's 2-bit sign codes. No temporary the size of the parameter: each 32-element
// word is formed in registers (an OR reduction of table bits, vectorised as pack_signs_ is) and
// stored; the only other output is one popcount per 1024-element block, written into
// block_offsets_out and turned into MaskedAdamW's offsets by a serial exclusive scan over the
// blocks (n / 1024 entries). Reads a and b (8 B/element fp32, or 4.25 with codes), writes
// 0.125 B/element.
#include "common.h"
#include "compact_state.h"
#include "ops.h"
#include "simd.h"

namespace cpl {
namespace cpu {

namespace {

// Word w from two tensors: conflicting = opposite strict signs (a product could underflow to
// -0 in fp32; the signs cannot). NaN compares false: collaborative.
template <typename T>
struct PairWord {
  const T* a;
  const T* b;
  CPL_INLINE uint32_t operator()(int64_t base, int64_t len) const {
    uint32_t bits = 0;
    // A constant trip count and the bit formed by a shift, not `cond ? 0 : kBits.bit[k]`: that form
    // compiled to a branch per vector that random signs mispredict (measured, 1M fp32, one thread:
    // 8.8 ns an element on random signs, 3.2 on all-positive ones; this form: 3.2 on both).
    if (len == kBitsPerWord) {
#pragma omp simd reduction(| : bits)
      for (int k = 0; k < kBitsPerWord; ++k) {
        const float x = to_f32(a[base + k]), y = to_f32(b[base + k]);
        const uint32_t conflicting = ((x > 0.f) & (y < 0.f)) | ((x < 0.f) & (y > 0.f));
        bits |= (conflicting ^ 1u) << k;
      }
      return bits;
    }
    for (int64_t k = 0; k < len; ++k) {  // the tensor's last, partial word
      const float x = to_f32(a[base + k]), y = to_f32(b[base + k]);
      bits |= (((x > 0.f) & (y < 0.f)) | ((x < 0.f) & (y > 0.f))) ? 0u : kBits.bit[k];
    }
    return bits;
  }
};

// Word w from a and b's sign codes, the signs expanded through simd.h's table (x * +-1 is exact).
template <typename T>
struct CodeWord {
  const T* a;
  const uint32_t* codes;
  int64_t n;
  CPL_INLINE uint32_t operator()(int64_t base, int64_t len) const {
    alignas(64) float s[kBitsPerWord];
    expand_signs(codes[base / kCodesPerWord], s);
    if (base + kCodesPerWord < n) expand_signs(codes[base / kCodesPerWord + 1], s + kCodesPerWord);
    uint32_t bits = 0;
    if (len == kBitsPerWord) {  // as PairWord (codes, random signs: ~7 -> 1.9 ns an element)
#pragma omp simd reduction(| : bits)
      for (int k = 0; k < kBitsPerWord; ++k) bits |= static_cast<uint32_t>(!conflicts_sign(to_f32(a[base + k]), s[k])) << k;
      return bits;
    }
    for (int64_t k = 0; k < len; ++k) bits |= conflicts_sign(to_f32(a[base + k]), s[k]) ? 0u : kBits.bit[k];
    return bits;
  }
};

// Blocks [b0, b1): their words, and each block's popcount into counts[b] when counts is given;
// returns the set bits.
template <class Word>
CPL_INLINE int64_t word_blocks(const Word& word, int64_t n, uint32_t* mask, int64_t* counts, int64_t b0, int64_t b1) {
  int64_t total = 0;
  for (int64_t b = b0; b < b1; ++b) {
    int64_t count = 0;
    for (int64_t w = b * kWordsPerBlock; w < (b + 1) * kWordsPerBlock && w * kBitsPerWord < n; ++w) {
      const int64_t base = w * kBitsPerWord;
      const uint32_t bits = word(base, std::min<int64_t>(kBitsPerWord, n - base));
      mask[w] = bits;
      count += __builtin_popcount(bits);
    }
    if (counts) counts[b] = count;
    total += count;
  }
  return total;
}

template <class Word>
int64_t word_blocks_base(const Word& word, int64_t n, uint32_t* mask, int64_t* counts, int64_t b0, int64_t b1) {
  return word_blocks(word, n, mask, counts, b0, b1);
}

template <class Word>
CPL_TARGET_AVX2 int64_t word_blocks_avx2(const Word& word, int64_t n, uint32_t* mask, int64_t* counts, int64_t b0,
                                         int64_t b1) {
  return word_blocks(word, n, mask, counts, b0, b1);
}

template <class Word>
int64_t write_words(const Word& word, int64_t n, uint32_t* mask, int64_t* counts) {
  const bool avx2 = cpu_has_avx2();
  return at::parallel_reduce(
      0, ceil_div(n, kOffsetBlock), std::max<int64_t>(1, kGrainElements / kOffsetBlock), int64_t{0},
      [&](int64_t b0, int64_t b1, int64_t) {
        return avx2 ? word_blocks_avx2(word, n, mask, counts, b0, b1) : word_blocks_base(word, n, mask, counts, b0, b1);
      },
      [](int64_t x, int64_t y) { return x + y; });
}

}  // namespace

at::Tensor cpl_mask_words(const at::Tensor& a, const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& codes,
                          const at::Tensor& mask_out, const std::optional<at::Tensor>& block_offsets_out) {
  const char* op = "cpl_mask_words";
  check_float_param(a, op, "a");
  const int64_t n = a.numel();
  const bool has_b = b.has_value() && b->defined(), has_codes = codes.has_value() && codes->defined();
  TORCH_CHECK_VALUE(has_b != has_codes, "cpl.", op, ": pass exactly one of 'b' and 'codes', got ",
                    has_b ? "both" : "neither");
  if (has_b) {
    check_exact(*b, op, "b", a.scalar_type(), n);
  } else {
    check_exact(*codes, op, "codes", at::kInt, ceil_div(n, kCodesPerWord));
  }
  check_exact(mask_out, op, "mask_out", at::kInt, ceil_div(n, kBitsPerWord));
  int64_t* counts = nullptr;
  if (block_offsets_out.has_value() && block_offsets_out->defined()) {
    check_exact(*block_offsets_out, op, "block_offsets_out", at::kLong, ceil_div(n, kOffsetBlock));
    counts = block_offsets_out->mutable_data_ptr<int64_t>();
  }
  uint32_t* mask = reinterpret_cast<uint32_t*>(mask_out.mutable_data_ptr<int32_t>());
  const int64_t total = CPL_DISPATCH_PARAM_TYPES(a.scalar_type(), op, [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    if (has_b) return write_words(PairWord<scalar_t>{pa, b->const_data_ptr<scalar_t>()}, n, mask, counts);
    const uint32_t* pc = reinterpret_cast<const uint32_t*>(codes->const_data_ptr<int32_t>());
    return write_words(CodeWord<scalar_t>{pa, pc, n}, n, mask, counts);
  });
  if (counts) {  // per-block popcounts -> exclusive prefix sums (block_offsets)
    int64_t running = 0;
    for (int64_t blk = 0; blk < ceil_div(n, kOffsetBlock); ++blk) {
      const int64_t c = counts[blk];
      counts[blk] = running;
      running += c;
    }
  }
  at::Tensor out = at::empty({}, at::kLong);
  out.fill_(total);
  return out;
}

}  // namespace cpu
}  // namespace cpl
