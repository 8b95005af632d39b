// Runtime ISA dispatch and vectorisable fp32 <-> storage conversions for the CPU kernels.
//
// Why: setup.py builds with -O3 and no -march (the wheel must run on any x86-64), so plain loops
// compile to SSE2. Each hot loop is written once as an always-inline template and instantiated
// twice: as is (baseline x86-64) and inside a function carrying CPL_TARGET_AVX2, picked at run
// time by cpu_has_avx2(). The vectoriser then emits 8-wide AVX2 code for the same source.
// Measured on a 2-core AMD EPYC (AVX2, no AVX-512), 16M fp32, CPL AdamW step with codes:
// the original per-element lambda (scalar: branches on random sign codes) 775 ms; the
// branch-free baseline build ~60 ms; the AVX2 build reaches the memory-bandwidth limit
// (benchmarks/results/; the step engine, engine.h, is written the same way).
// AVX-512 is not compiled in: no machine here can test it, and the AVX2 path is already
// bound by memory bandwidth, where wider vectors buy nothing.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#define CPL_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__)
#define CPL_HAVE_AVX2_DISPATCH 1
// AVX2 without FMA on purpose: with FMA enabled GCC contracts `g + wd * p` into one rounding,
// which flips the sign of near-cancelling sums against the reference (13 of 1M frozen counts in
// the bf16 Adam test) and the frozen counts must be exact. The step is memory-bound either way.
#define CPL_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define CPL_HAVE_AVX2_DISPATCH 0
#define CPL_TARGET_AVX2
#endif

namespace cpl {
namespace cpu {

// The CPL rule as a template argument of the step kernels (no per-element flag tests).
enum Rule : int { kNoReference = 0, kUpdateRule = 1, kGradientStrict = 2, kGradientSoft = 3 };

inline bool cpu_has_avx2() {
#if CPL_HAVE_AVX2_DISPATCH
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
  }();
  return ok;
#else
  return false;
#endif
}

// Branch-free conversions, bit-identical to c10's (round to nearest even; a NaN becomes the
// canonical bf16 NaN 0x7FC0 as c10 does). c10's own bf16 store tests isnan with a branch, which
// kept the loops scalar.
CPL_INLINE float to_f32(float x) { return x; }
CPL_INLINE float to_f32(c10::BFloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
CPL_INLINE float to_f32(c10::Half x) { return static_cast<float>(x); }

CPL_INLINE float from_f32(float x, float*) { return x; }
CPL_INLINE c10::BFloat16 from_f32(float x, c10::BFloat16*) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
  const uint16_t bits = static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}
CPL_INLINE c10::Half from_f32(float x, c10::Half*) { return c10::Half(x); }

template <typename T>
CPL_INLINE void store_f32(T* p, int64_t i, float x) { p[i] = from_f32(x, static_cast<T*>(nullptr)); }

// Sign of each 2-bit code, four codes (one byte of a code word) per row: +1 positive, -1
// negative, 0 zero. Expanding a word through this table and testing `x * sign < 0` keeps the
// per-element loop free of integer-to-bool logic, which GCC 12 refused to vectorise ("control
// flow in loop"). The product decides exactly as conflicts() in common.h: NaN, +-0 and a zero
// code never conflict (inf * 0 is NaN, not < 0).
struct SignTable {
  alignas(64) float row[256][4];
  constexpr SignTable() : row{} {
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 4; ++k) {
        const int c = (b >> (2 * k)) & 3;
        row[b][k] = c == 1 ? 1.f : (c == 2 ? -1.f : 0.f);
      }
  }
};
inline constexpr SignTable kSignTable{};

// The 16 signs of code word `word` into s[0..15].
CPL_INLINE void expand_signs(uint32_t word, float* s) {
  for (int b = 0; b < 4; ++b) std::memcpy(s + 4 * b, kSignTable.row[(word >> (8 * b)) & 255u], 4 * sizeof(float));
}

// The signs of `n` code words into s[0..16n), as expand_signs, with AVX2: each word's codes are
// shifted into the low two bits of 8 lanes at a time and the sign looked up with one in-register
// permute (vpermilps reads the low two bits of each lane): 7 instructions a word instead of the
// table's 22 (four loads, four stores, shifts). Measured in the engine's SGD momentum step with
// codes, 16M fp32, 2 threads: 1.29x -> 1.18x a plain momentum loop (median of 3 runs of 30 rounds).
#if CPL_HAVE_AVX2_DISPATCH
CPL_TARGET_AVX2 inline void expand_signs_avx2(const uint32_t* words, int64_t n, float* s) {
  const __m256i low = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i high = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
  const __m256 sign_of_code = _mm256_setr_ps(0.f, 1.f, -1.f, 0.f, 0.f, 1.f, -1.f, 0.f);  // codes 0..3, per 128 bits
  for (int64_t w = 0; w < n; ++w) {
    const __m256i word = _mm256_set1_epi32(static_cast<int>(words[w]));
    _mm256_storeu_ps(s + 16 * w, _mm256_permutevar_ps(sign_of_code, _mm256_srlv_epi32(word, low)));
    _mm256_storeu_ps(s + 16 * w + 8, _mm256_permutevar_ps(sign_of_code, _mm256_srlv_epi32(word, high)));
  }
}
#else
inline void expand_signs_avx2(const uint32_t* words, int64_t n, float* s) {
  for (int64_t w = 0; w < n; ++w) expand_signs(words[w], s + 16 * w);
}
#endif

// Bit k of a word and the two bits of code k, as tables: `cond ? kBit[k] : 0` vectorises as a
// blend where `cond << k` would need AVX2's per-lane variable shifts.
struct BitTables {
  alignas(64) uint32_t bit[32];
  alignas(64) uint32_t pos[16];
  alignas(64) uint32_t neg[16];
  constexpr BitTables() : bit{}, pos{}, neg{} {
    for (int k = 0; k < 32; ++k) bit[k] = 1u << k;
    for (int k = 0; k < 16; ++k) pos[k] = 1u << (2 * k), neg[k] = 2u << (2 * k);
  }
};
inline constexpr BitTables kBits{};

CPL_INLINE bool conflicts_sign(float x, float sign) { return x * sign < 0.f; }

// `drop ? +0 : x` as a bit mask, for the step `p - keep_unless(lr * u, frozen)`: p - (+0) is p bit
// for bit (also -0, inf, NaN). Written as `frozen ? p : p - lr*u` (or with a ternary on 0.f), GCC
// sees that storing p back is a no-op for fp32, turns the select into a conditional store and then
// refuses to vectorise the loop ("control flow in loop"): 117 ms instead of ~9 ms for 4M
// elements, one core.
CPL_INLINE float keep_unless(float x, bool drop) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  u &= static_cast<uint32_t>(drop) - 1u;  // drop: 0, keep: all ones
  float out;
  std::memcpy(&out, &u, sizeof out);
  return out;
}

// `take_a ? a : b` as bit masks, for a condition GCC cannot prove uniform: written as a ternary
// inside an `omp simd` reduction loop it becomes a branch and the loop stays scalar.
CPL_INLINE float select_bits(bool take_a, float a, float b) {
  uint32_t ua, ub;
  std::memcpy(&ua, &a, sizeof ua);
  std::memcpy(&ub, &b, sizeof ub);
  const uint32_t mask = 0u - static_cast<uint32_t>(take_a);
  const uint32_t out_bits = (ua & mask) | (ub & ~mask);
  float out;
  std::memcpy(&out, &out_bits, sizeof out);
  return out;
}

}  // namespace cpu
}  // namespace cpl
