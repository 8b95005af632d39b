// contribution_stats(_codes): counts and fp64 sums of the elementwise products a*b, optional
// packed collaborative mask (docs/design.md section 3; contract: cpl_kernels/reference.py).
//
// One fused pass over a, b (or the codes) and the mask. Partial results are formed per fixed-size
// chunk and summed in chunk order, so nothing depends on the thread count.
//
// Why it looks like this: the first version formed 32 fp64 products into an array per mask word
// and reduced it in a second `omp simd` loop; GCC kept the fp32 -> fp64 conversions and the array
// round trip mostly scalar: 6% of the in-place bandwidth (1.8 GB/s, benchmarks/results). The loop
// is now bound by its vector op count (about 21 per 8 fp32 pairs), so each step below removes ops:
//   * the sign class is decided on the fp32 factors, not on the product: a*b is nonzero iff both
//     factors are ordered and nonzero (NaN, +-0 and inf*0 = NaN all count as zero), and then its
//     sign is sign(a) xor sign(b). That is exact: in fp64 the product of two nonzero fp32 never
//     underflows (2^-149 squared is 2^-298) nor overflows, and inf times a nonzero is a signed inf.
//     The mask word is the movemask of the negative lanes; the counts are popcounts of the words.
//   * the products are formed in fp64 (two 4-lane halves, exact for fp32 inputs; fp32 storage is
//     converted straight from memory) and split as max(p, 0) and min(p, 0) into per-lane fp64
//     accumulators held in registers over the chunk. max/min return their second operand (+0) for
//     a NaN p, and a NaN or +-0 product belongs to neither sum, so the sums need no mask.
//   * b given as codes: the signs come from two tables (fp32 for the class, fp64 for the product),
//     a load each instead of shifts and compares.
//   * bf16 and fp16 are widened to fp32 in registers (bf16: a shift; fp16: exponent rebias, no
//     F16C and no denormal arithmetic, so it is exact whatever the FTZ/DAZ mode).
//   * software prefetch 4 KiB ahead (kPrefetch below).
// The AVX2 path uses intrinsics (AVX2 + POPCNT, no FMA: nothing here may contract); the portable
// path runs the same arithmetic with the same lane assignment (element i of a chunk goes to
// accumulator lane i % 8, lanes reduced in one fixed order), so both builds return bit-identical
// counts, sums and masks (checked on the edge cases of tests/test_ops_pack_and_stats.py, every
// dtype, with the dispatch forced to the portable path).
// Measured (16M fp32 on the 2-vCPU AMD EPYC (Zen 3) dev machine while shared, load average 7-8, so
// the in-place stream itself reached only 7-11 GB/s; % of the in-place bandwidth of x.mul_(c) on
// 64M elements timed in the same interleaved rounds, as benchmarks/bench_ops.py records it; median
// of 5 processes x 7 rounds, old and new build alternating):
//                                    before   after
//   contribution_stats(a, b, mask)    5.9%    55.6%   (2 threads, wall time)
//   contribution_stats_codes          3.1%    31.6%
//   contribution_stats bf16           2.9%    27.9%   (4.125 B/element)
//   contribution_stats, 1 thread       5.2%    59.2%   (CPU time: the stream and the op both on one core)
// The codes and bf16 variants move half the bytes for the same vector work, hence the lower share.
#include <algorithm>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

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
constexpr int kLanes = 8;                   // fp64 accumulator lanes (two AVX2 4-lane halves)
static_assert(kChunk % kBitsPerWord == 0 && kBitsPerWord % kLanes == 0, "chunk/word/lane layout");

// The two factors of element i as fp32: b given as a tensor, or as sign codes (+1, -1, 0).
template <typename T>
struct PairSource {
  const T* a;
  const T* b;
  CPL_INLINE float a_at(int64_t i) const { return to_f32(a[i]); }
  CPL_INLINE float b_at(int64_t i) const { return to_f32(b[i]); }
};

template <typename T>
struct CodeSource {
  const T* a;
  const uint32_t* codes;
  CPL_INLINE float a_at(int64_t i) const { return to_f32(a[i]); }
  CPL_INLINE float b_at(int64_t i) const {
    const uint32_t c = (codes[i / kCodesPerWord] >> (2 * (i % kCodesPerWord))) & 3u;
    return c == kCodePos ? 1.f : (c == kCodeNeg ? -1.f : 0.f);
  }
};

// Per-lane fp64 sums of a chunk, reduced in one fixed order: lane k + lane k+4, then pairwise.
CPL_INLINE double reduce_lanes(const double* s) {
  const double t0 = s[0] + s[4], t1 = s[1] + s[5], t2 = s[2] + s[6], t3 = s[3] + s[7];
  return (t0 + t1) + (t2 + t3);
}

CPL_INLINE bool ordered_nonzero(float x) { return (x < 0.f) | (x > 0.f); }  // false for +-0 and NaN

// Portable path (baseline x86-64 and other targets): the AVX2 arithmetic with the same lane
// assignment, written as two short loops per mask word that GCC vectorises for SSE2: the class
// bits (tables instead of variable shifts, as in the first version) and the 8-lane fp64 sums.
template <typename Source>
CPL_INLINE Partial chunk_stats_portable(const Source& src, int64_t begin, int64_t end, uint32_t* mask) {
  double pos_sum[kLanes] = {}, neg_sum[kLanes] = {};
  int64_t pos = 0, neg = 0;
  for (int64_t base = begin; base < end; base += kBitsPerWord) {
    const int len = static_cast<int>(std::min<int64_t>(kBitsPerWord, end - base));
    alignas(64) float x[kBitsPerWord] = {}, y[kBitsPerWord] = {};  // zero padding adds +0, as AVX2
    for (int k = 0; k < len; ++k) x[k] = src.a_at(base + k), y[k] = src.b_at(base + k);
    uint32_t neg_bits = 0, nonzero_bits = 0;
#pragma omp simd reduction(| : neg_bits, nonzero_bits)
    for (int k = 0; k < kBitsPerWord; ++k) {  // `&`, not `&&`: no control flow in the loop
      const bool nonzero = ordered_nonzero(x[k]) & ordered_nonzero(y[k]);
      const bool is_neg = nonzero & ((x[k] < 0.f) != (y[k] < 0.f));  // both ordered nonzero here
      nonzero_bits |= nonzero ? kBits.bit[k] : 0u;
      neg_bits |= is_neg ? kBits.bit[k] : 0u;
    }
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {  // lane j: elements j, j + 8, j + 16, j + 24 in order
      double ps = pos_sum[j], ns = neg_sum[j];
      for (int g = 0; g < kBitsPerWord; g += kLanes) {
        const double p = static_cast<double>(x[g + j]) * static_cast<double>(y[g + j]);
        ps += p > 0.0 ? p : 0.0;  // as _mm256_max_pd(p, +0): NaN -> +0
        ns += p < 0.0 ? p : 0.0;  // as _mm256_min_pd(p, +0)
      }
      pos_sum[j] = ps, neg_sum[j] = ns;
    }
    pos += __builtin_popcount(nonzero_bits & ~neg_bits);
    neg += __builtin_popcount(neg_bits);
    const uint32_t valid = len == kBitsPerWord ? ~0u : (1u << len) - 1u;  // bits past n stay 0
    if (mask) mask[base / kBitsPerWord] = ~neg_bits & valid;
  }
  Partial out;
  out.pos = pos, out.neg = neg, out.zero = (end - begin) - pos - neg;
  out.pos_sum = reduce_lanes(pos_sum), out.neg_sum = reduce_lanes(neg_sum);
  return out;
}

template <typename Source>
Partial chunk_stats_base(const Source& src, int64_t begin, int64_t end, uint32_t* mask) {
  return chunk_stats_portable(src, begin, end, mask);
}

#if CPL_HAVE_AVX2_DISPATCH

// AVX2 plus POPCNT (every AVX2 CPU has it; checked at run time with AVX2): the counts are two
// popcounts per mask word instead of per-lane vector counters, which would cost 3 more vector ops
// per 8 elements in a loop whose speed is set by its vector op count.
#define CPL_STATS_TARGET __attribute__((target("avx2,popcnt")))

bool cpu_has_stats_avx2() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return cpu_has_avx2() && __builtin_cpu_supports("popcnt");
  }();
  return ok;
}

// The signs (+1, -1, 0) of 4 codes (one byte of a code word) as fp64, for the products
// a * sign: the AVX2 loop loads them instead of converting (a load costs no vector op).
struct SignTable64 {
  alignas(64) double row[256][4];
  constexpr SignTable64() : row{} {
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 4; ++k) {
        const int c = (b >> (2 * k)) & 3;
        row[b][k] = c == 1 ? 1.0 : (c == 2 ? -1.0 : 0.0);
      }
  }
};
inline constexpr SignTable64 kSignTable64{};

// 8 elements widened to fp32.
CPL_STATS_TARGET CPL_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

CPL_STATS_TARGET CPL_INLINE __m256 load8(const c10::BFloat16* p) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

// fp16 -> fp32 on the bits, exact (as c10::Half): rebias the exponent by 127 - 15; inf/NaN get the
// fp32 all-ones exponent; a denormal (or zero) m * 2^-24 is formed as (2^-14 + m * 2^-24) - 2^-14,
// a subtraction of two normal numbers, so no denormal arithmetic is involved.
CPL_STATS_TARGET CPL_INLINE __m256 load8(const c10::Half* p) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0x8000)), 16);
  const __m256i em = _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0x7FFF)), 13);
  const __m256i exp = _mm256_and_si256(em, _mm256_set1_epi32(0x0F800000));
  const __m256i rebias = _mm256_set1_epi32(112 << 23);
  __m256i o = _mm256_add_epi32(em, rebias);
  const __m256i infnan = _mm256_cmpeq_epi32(exp, _mm256_set1_epi32(0x0F800000));
  o = _mm256_add_epi32(o, _mm256_and_si256(infnan, rebias));
  const __m256i denormal = _mm256_cmpeq_epi32(exp, _mm256_setzero_si256());
  const __m256 magic = _mm256_castsi256_ps(_mm256_set1_epi32(113 << 23));  // 2^-14
  const __m256 sub = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_add_epi32(o, _mm256_set1_epi32(1 << 23))), magic);
  o = _mm256_blendv_epi8(o, _mm256_castps_si256(sub), denormal);
  return _mm256_castsi256_ps(_mm256_or_si256(o, sign));
}

// Elements 0-3 and 4-7 of 8 in fp64. For fp32 storage the conversion reads memory directly
// (vcvtps2pd ymm, m128: no 128-bit extract); the others convert the widened register.
CPL_STATS_TARGET CPL_INLINE __m256d lo4(const float* p, __m256) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
CPL_STATS_TARGET CPL_INLINE __m256d hi4(const float* p, __m256) { return _mm256_cvtps_pd(_mm_loadu_ps(p + 4)); }
template <typename T>
CPL_STATS_TARGET CPL_INLINE __m256d lo4(const T*, __m256 x) { return _mm256_cvtps_pd(_mm256_castps256_ps128(x)); }
template <typename T>
CPL_STATS_TARGET CPL_INLINE __m256d hi4(const T*, __m256 x) { return _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)); }

// Factors of 8 elements: fp32 (for the sign class) and the two fp64 halves of the products.
struct Group {
  __m256 a, b;
  __m256d p_lo, p_hi;
};

template <typename T>
CPL_STATS_TARGET CPL_INLINE Group load_group(const PairSource<T>& s, int64_t i) {
  Group g;
  g.a = load8(s.a + i), g.b = load8(s.b + i);
  g.p_lo = _mm256_mul_pd(lo4(s.a + i, g.a), lo4(s.b + i, g.b));
  g.p_hi = _mm256_mul_pd(hi4(s.a + i, g.a), hi4(s.b + i, g.b));
  return g;
}

// b given as codes: its fp32 signs from kSignTable (simd.h) and fp64 signs from kSignTable64,
// one row per 4 codes; i % 8 == 0, so the 8 codes are one half of a code word.
template <typename T>
CPL_STATS_TARGET CPL_INLINE Group load_group(const CodeSource<T>& s, int64_t i) {
  const uint32_t bits = s.codes[i / kCodesPerWord] >> (2 * (i % kCodesPerWord));
  const uint32_t c0 = bits & 255u, c1 = (bits >> 8) & 255u;
  Group g;
  g.a = load8(s.a + i);
  g.b = _mm256_loadu2_m128(kSignTable.row[c1], kSignTable.row[c0]);
  g.p_lo = _mm256_mul_pd(lo4(s.a + i, g.a), _mm256_load_pd(kSignTable64.row[c0]));
  g.p_hi = _mm256_mul_pd(hi4(s.a + i, g.a), _mm256_load_pd(kSignTable64.row[c1]));
  return g;
}

// Software prefetch of the streams 1024 elements (4 KiB of fp32) ahead, every 64-byte line once.
// The loop keeps the vector units busy, and with the hardware prefetcher alone it also waited on
// memory: 1.5 ns/element from DRAM against ~0.9 in cache (one thread). Measured in the same
// process, 16M fp32, 2 threads: 37-44% -> 54-59% of the in-place bandwidth; distances 512-2048
// did about as well, 256 and 4096 worse, and T1/NTA hints no better than T0. Past the end of a
// chunk it fetches the next chunk; past the end of the tensor it is harmless (no fault).
constexpr int64_t kPrefetch = 1024;

template <typename T>
CPL_STATS_TARGET CPL_INLINE void prefetch_word(const T* p, int64_t i) {
  const char* line = reinterpret_cast<const char*>(p + i + kPrefetch);
  for (int64_t off = 0; off < static_cast<int64_t>(kBitsPerWord * sizeof(T)); off += 64)
    _mm_prefetch(line + off, _MM_HINT_T0);
}
template <typename T>
CPL_STATS_TARGET CPL_INLINE void prefetch_word(const PairSource<T>& s, int64_t i) {
  prefetch_word(s.a, i), prefetch_word(s.b, i);
}
template <typename T>
CPL_STATS_TARGET CPL_INLINE void prefetch_word(const CodeSource<T>& s, int64_t i) {
  prefetch_word(s.a, i);  // the codes (8 bytes a word) are left to the hardware prefetcher
}

struct Avx2Acc {
  __m256d pos_lo, pos_hi, neg_lo, neg_hi;  // fp64 sums, lanes 0-3 and 4-7 (element i -> lane i % 8)
};

// 8 elements: adds to the sums; returns the sign bits of a xor b and, in `nonzero_bits`, the
// lanes whose product is nonzero (both factors ordered and nonzero). The AND of the two is left to
// the caller, once per word on scalar registers (one vector op less per 8 elements).
CPL_STATS_TARGET CPL_INLINE uint32_t group8(const Group& g, Avx2Acc& acc, uint32_t& nonzero_bits) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 nonzero = _mm256_and_ps(_mm256_cmp_ps(g.a, zero, _CMP_NEQ_OQ), _mm256_cmp_ps(g.b, zero, _CMP_NEQ_OQ));
  nonzero_bits = static_cast<uint32_t>(_mm256_movemask_ps(nonzero));
  const __m256d z = _mm256_setzero_pd();
  acc.pos_lo = _mm256_add_pd(acc.pos_lo, _mm256_max_pd(g.p_lo, z));  // (p > 0) ? p : +0, NaN -> +0
  acc.pos_hi = _mm256_add_pd(acc.pos_hi, _mm256_max_pd(g.p_hi, z));
  acc.neg_lo = _mm256_add_pd(acc.neg_lo, _mm256_min_pd(g.p_lo, z));  // (p < 0) ? p : +0, NaN -> +0
  acc.neg_hi = _mm256_add_pd(acc.neg_hi, _mm256_min_pd(g.p_hi, z));
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_xor_ps(g.a, g.b)));
}

// One mask word, elements [base, base + 32) of `src`: adds to the sums and counts, returns the
// negative-product bits.
template <typename Source>
CPL_STATS_TARGET CPL_INLINE uint32_t word32(const Source& src, int64_t base, Avx2Acc& acc, int64_t& nonzero,
                                            int64_t& neg) {
  uint32_t sign_bits = 0, nonzero_bits = 0;
  for (int g = 0; g < kBitsPerWord / kLanes; ++g) {
    uint32_t nz;
    sign_bits |= group8(load_group(src, base + g * kLanes), acc, nz) << (g * kLanes);
    nonzero_bits |= nz << (g * kLanes);
  }
  const uint32_t neg_bits = sign_bits & nonzero_bits;
  nonzero += __builtin_popcount(nonzero_bits);
  neg += __builtin_popcount(neg_bits);
  return neg_bits;
}

template <typename Source>
CPL_STATS_TARGET Partial chunk_stats_avx2(const Source& src, int64_t begin, int64_t end, uint32_t* mask) {
  Avx2Acc acc{_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t nonzero = 0, neg = 0;
  const int64_t full_end = begin + (end - begin) / kBitsPerWord * kBitsPerWord;
  for (int64_t base = begin; base < full_end; base += kBitsPerWord) {
    prefetch_word(src, base);
    const uint32_t neg_bits = word32(src, base, acc, nonzero, neg);
    if (mask) mask[base / kBitsPerWord] = ~neg_bits;
  }
  if (full_end < end) {  // the last, partial word of the tensor: zero-padded fp32 copies (0 * 0 adds +0)
    const int len = static_cast<int>(end - full_end);
    alignas(32) float a[kBitsPerWord] = {}, b[kBitsPerWord] = {};
    for (int k = 0; k < len; ++k) a[k] = src.a_at(full_end + k), b[k] = src.b_at(full_end + k);
    const uint32_t neg_bits = word32(PairSource<float>{a, b}, 0, acc, nonzero, neg);
    if (mask) mask[full_end / kBitsPerWord] = ~neg_bits & ((1u << len) - 1u);  // bits past n stay 0
  }
  alignas(32) double s[2 * kLanes];
  _mm256_store_pd(s, acc.pos_lo), _mm256_store_pd(s + 4, acc.pos_hi);
  _mm256_store_pd(s + 8, acc.neg_lo), _mm256_store_pd(s + 12, acc.neg_hi);
  Partial out;
  out.neg = neg, out.pos = nonzero - neg, out.zero = (end - begin) - nonzero;
  out.pos_sum = reduce_lanes(s), out.neg_sum = reduce_lanes(s + kLanes);
  return out;
}

#endif  // CPL_HAVE_AVX2_DISPATCH

template <typename Source>
std::tuple<at::Tensor, at::Tensor> reduce_products(int64_t n, uint32_t* mask, const Source& src) {
  const int64_t chunks = ceil_div(n, kChunk);
  std::vector<Partial> partial(chunks);
#if CPL_HAVE_AVX2_DISPATCH
  const bool avx2 = cpu_has_stats_avx2();
#else
  const bool avx2 = false;
#endif
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
#if CPL_HAVE_AVX2_DISPATCH
      if (avx2) {
        partial[c] = chunk_stats_avx2(src, begin, end, mask);
        continue;
      }
#endif
      partial[c] = chunk_stats_base(src, begin, end, mask);
    }
  });
  (void)avx2;
  Partial total;
  for (const Partial& p : partial) {  // chunk order: the sums do not depend on the thread count
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
    return reduce_products(n, mask, PairSource<scalar_t>{pa, pb});
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
    return reduce_products(n, mask, CodeSource<scalar_t>{pa, pc});
  });
}

}  // namespace cpu
}  // namespace cpl
