// pack_signs_: 2-bit sign codes of src, 16 per int32 word, written in place.
#include "common.h"

namespace cpl {
namespace cpu {

template <typename T>
static void pack_signs_kernel(const T* src, uint32_t* codes, int64_t n) {
  const int64_t words = ceil_div(n, kCodesPerWord);
  at::parallel_for(0, words, kGrainElements / kCodesPerWord, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t base = w * kCodesPerWord;
      const int64_t len = std::min<int64_t>(kCodesPerWord, n - base);
      uint32_t word = 0;
      for (int64_t k = 0; k < len; ++k) word |= sign_code(load(src, base + k)) << (2 * k);
      codes[w] = word;
    }
  });
}

void pack_signs_(const at::Tensor& src, const at::Tensor& codes) {
  check_float_param(src, "pack_signs_", "src");
  check_exact(codes, "pack_signs_", "codes", at::kInt, ceil_div(src.numel(), kCodesPerWord));
  CPL_DISPATCH_PARAM_TYPES(src.scalar_type(), "pack_signs_", [&] {
    pack_signs_kernel(src.const_data_ptr<scalar_t>(),
                      reinterpret_cast<uint32_t*>(codes.mutable_data_ptr<int32_t>()), src.numel());
  });
}

}  // namespace cpu
}  // namespace cpl
