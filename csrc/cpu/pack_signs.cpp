// pack_signs_: 2-bit sign codes of src, 16 per int32 word, written in place.
// Reads 4 B (fp32) and writes 0.25 B per element; the 16-lane loop per word is vectorised (OR
// reduction of table bits) and compiled for baseline x86-64 and AVX2, picked at run time.
#include "common.h"
#include "simd.h"

namespace cpl {
namespace cpu {

namespace {

template <typename T>
CPL_INLINE uint32_t pack_word(const T* __restrict src, int64_t base, int64_t len) {
  uint32_t word = 0;
  if (len == kCodesPerWord) {
#pragma omp simd reduction(| : word)
    for (int k = 0; k < 16; ++k) {
      const float x = to_f32(src[base + k]);  // NaN and +-0: code 0
      word |= (x > 0.f ? kBits.pos[k] : 0u) | (x < 0.f ? kBits.neg[k] : 0u);
    }
  } else {
    for (int64_t k = 0; k < len; ++k) word |= sign_code(to_f32(src[base + k])) << (2 * k);
  }
  return word;
}

template <typename T>
CPL_INLINE void pack_words(const T* src, uint32_t* codes, int64_t n, int64_t w0, int64_t w1) {
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t base = w * kCodesPerWord;
    codes[w] = pack_word(src, base, std::min<int64_t>(kCodesPerWord, n - base));
  }
}

template <typename T>
void pack_words_base(const T* src, uint32_t* codes, int64_t n, int64_t w0, int64_t w1) {
  pack_words(src, codes, n, w0, w1);
}

template <typename T>
CPL_TARGET_AVX2 void pack_words_avx2(const T* src, uint32_t* codes, int64_t n, int64_t w0, int64_t w1) {
  pack_words(src, codes, n, w0, w1);
}

}  // namespace

void pack_signs_(const at::Tensor& src, const at::Tensor& codes) {
  check_float_param(src, "pack_signs_", "src");
  check_exact(codes, "pack_signs_", "codes", at::kInt, ceil_div(src.numel(), kCodesPerWord));
  const bool avx2 = cpu_has_avx2();
  CPL_DISPATCH_PARAM_TYPES(src.scalar_type(), "pack_signs_", [&] {
    const scalar_t* s = src.const_data_ptr<scalar_t>();
    uint32_t* c = reinterpret_cast<uint32_t*>(codes.mutable_data_ptr<int32_t>());
    const int64_t n = src.numel();
    at::parallel_for(0, ceil_div(n, kCodesPerWord), kGrainElements / kCodesPerWord, [&](int64_t w0, int64_t w1) {
      avx2 ? pack_words_avx2(s, c, n, w0, w1) : pack_words_base(s, c, n, w0, w1);
    });
  });
}

}  // namespace cpu
}  // namespace cpl
