// Quantization of the 8-bit state format (docs/design.md section 8) on CPU: the code of y (a value
// of a block divided by its absmax, so |y| <= 1, or NaN) is the number of thresholds <= y
// (cpl_kernels/quant8.py: the thresholds encode torchao's nearest-entry rule exactly).
//
// Why a bucket table: counting by an 8-step binary search costs 8 dependent table loads a value
// (28 ns a value on one core of the 2-core EPYC); here the fp32 bits of y pick a bucket, and the
// buckets are fine enough that at most one of the 255 thresholds of the bitsandbytes maps falls
// in each, so the count is the thresholds below the bucket plus one compare with the threshold
// in the bucket, if any. Buckets: the order-preserving integer key of y, with magnitudes under
// 2^-24 folded to 0 (no threshold lies there: the smallest are ~1.6e-7) and the rest cut every
// 2^15 keys (256 buckets an octave; 2^16 put two thresholds of the maps in some buckets).
//
// One load a value: a bucket's entry packs the count below it (8 bits) with the offset of its
// threshold among the bucket's 2^15 keys (0x8000: no threshold in it), and y's own offset comes
// from its key's low 15 bits. Two tables (the count, and the threshold as a float) cost two
// gathers per 8 values; the gathers were half of the 8-bit AdamW step (perf, 16M fp32, 2 threads).
// The table (12289 buckets, 48 KiB) is built per call from the qmaps argument and checked: a map
// whose thresholds are not sorted, fall two to a bucket, lie in the folded bucket (but a first
// threshold of FLT_MIN, the unsigned map's floor) or outside (-1, 1) is refused
// (BucketTable::build returns false).
//
// AVX2 (codes_avx2, dequantize_avx2): 8 values at a time, the tables read by table8 (GCC leaves
// the scalar loops' table loads unvectorised); the same integer operations, the same codes.
#pragma once

#include <cstdint>
#include <cstring>

#include "simd.h"

#if CPL_HAVE_AVX2_DISPATCH
#include <immintrin.h>
#endif

namespace cpl {
namespace cpu {
namespace quant8 {

constexpr int kMapEntries = 256;
constexpr int kShift = 15;
constexpr int32_t kKeyOne = 0x3f800000;   // key of 1.0f
constexpr int32_t kKeyTiny = 0x33800000;  // key of 2^-24
constexpr int32_t kHalf = (kKeyOne - kKeyTiny) >> kShift;
constexpr int kBuckets = 2 * kHalf + 1;
constexpr int32_t kOffsetMask = (1 << kShift) - 1;
constexpr int32_t kNone = 1 << kShift;  // offset of an empty bucket's threshold: above every key's
constexpr int32_t kKeyFloor = 0x00800000;  // key of FLT_MIN: the unsigned map's floor threshold

// Integer keys ordered as the fp32 values (both zeros: 0; NaN: beyond every finite key).
CPL_INLINE int32_t order_key(float y) {
  int32_t b;
  std::memcpy(&b, &y, sizeof b);
  return b >= 0 ? b : -(b & 0x7fffffff);
}

CPL_INLINE int32_t clamp_key(int32_t k) { return k < -kKeyOne ? -kKeyOne : (k > kKeyOne ? kKeyOne : k); }

// Of a clamped key: its bucket, and its offset among the bucket's keys in increasing order
// (a negative key counts down from the bucket's top: 0x7fff minus its magnitude's low bits).
CPL_INLINE int32_t bucket_of(int32_t k) {
  const int32_t a = k < 0 ? -k : k;
  int32_t v = a - kKeyTiny;
  v = (v < 0 ? 0 : v) >> kShift;
  return k < 0 ? kHalf - v : kHalf + v;
}
CPL_INLINE int32_t offset_of(int32_t k) {
  const int32_t a = k < 0 ? -k : k;
  const int32_t low = (a - kKeyTiny) & kOffsetMask;
  return k < 0 ? kOffsetMask - low : low;
}

struct BucketTable {
  // Per bucket: thresholds below it | (offset of its threshold, or kNone) << 8.
  alignas(64) int32_t entry[kBuckets];
  // The map's first threshold is FLT_MIN (quant8.py thresholds: a positive v never rounds to code
  // 0). It is the one threshold allowed in the folded bucket, compared there by key.
  bool floor = false;

  // From 256 thresholds (the last +inf, ignored); false when the map breaks the table's premise.
  bool build(const float* thresholds) {
    int32_t in_bucket[kBuckets] = {};
    int32_t offset[kBuckets];
    for (int b = 0; b < kBuckets; ++b) offset[b] = kNone;
    for (int c = 0; c < kMapEntries - 1; ++c) {
      const float t = thresholds[c];
      if (c > 0 && !(thresholds[c - 1] <= t)) return false;  // also NaN
      if (!(t > -1.f && t < 1.f)) return false;               // y = x / absmax never leaves [-1, 1]
      const int32_t k = order_key(t);
      const int32_t b = bucket_of(k);
      if (b == kHalf) {  // the folded bucket has no offsets: only the floor, counted by key
        if (c != 0 || k != kKeyFloor) return false;
        floor = true;
        ++in_bucket[b];
        continue;
      }
      if (++in_bucket[b] > 1) return false;
      offset[b] = offset_of(k);
    }
    int32_t count = 0;
    for (int b = 0; b < kBuckets; ++b) {
      entry[b] = count | (offset[b] << 8);
      count += in_bucket[b];
    }
    return true;
  }

  // The code of y; NaN: 0.
  CPL_INLINE int32_t code(float y) const {
    const int32_t k = clamp_key(order_key(y));
    const int32_t b = bucket_of(k);
    const int32_t e = entry[b];
    const int32_t c = (e & 0xff) + static_cast<int32_t>(offset_of(k) >= (e >> 8)) +
                      static_cast<int32_t>(floor && b == kHalf && k >= kKeyFloor);
    return y == y ? c : 0;
  }
};

#if CPL_HAVE_AVX2_DISPATCH
// table[idx[k]] for 8 indices (each checked in range by its caller's arithmetic). Eight scalar
// loads inserted into two halves, not vpgatherdd: on the 2-core EPYC (Zen 3) the gather is the
// slower way to read 8 L1-resident words (one core, 256-value blocks: quantizing 1.40 -> 1.12
// ns/value, dequantizing 0.78 -> 0.53; a store of the indices and scalar loads: 1.29 / 0.69).
CPL_TARGET_AVX2 CPL_INLINE __m256i table8(const int32_t* __restrict table, __m256i idx) {
  const __m128i lo = _mm256_castsi256_si128(idx), hi = _mm256_extracti128_si256(idx, 1);
  const uint64_t a = static_cast<uint64_t>(_mm_cvtsi128_si64(lo)), b = static_cast<uint64_t>(_mm_extract_epi64(lo, 1));
  const uint64_t c = static_cast<uint64_t>(_mm_cvtsi128_si64(hi)), d = static_cast<uint64_t>(_mm_extract_epi64(hi, 1));
  __m128i x = _mm_cvtsi32_si128(table[static_cast<uint32_t>(a)]);
  x = _mm_insert_epi32(x, table[a >> 32], 1);
  x = _mm_insert_epi32(x, table[static_cast<uint32_t>(b)], 2);
  x = _mm_insert_epi32(x, table[b >> 32], 3);
  __m128i y = _mm_cvtsi32_si128(table[static_cast<uint32_t>(c)]);
  y = _mm_insert_epi32(y, table[c >> 32], 1);
  y = _mm_insert_epi32(y, table[static_cast<uint32_t>(d)], 2);
  y = _mm_insert_epi32(y, table[d >> 32], 3);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(x), y, 1);
}

// The codes of 8 values (as int32): BucketTable::code, lane for lane.
CPL_TARGET_AVX2 CPL_INLINE __m256i code8(const BucketTable& t, __m256 y) {
  const __m256i bits = _mm256_castps_si256(y);
  // order_key: a negative float's key is minus its magnitude's bits (blendv_ps picks by sign bit).
  const __m256i neg_key = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)));
  __m256i k = _mm256_castps_si256(_mm256_blendv_ps(y, _mm256_castsi256_ps(neg_key), y));
  k = _mm256_min_epi32(_mm256_max_epi32(k, _mm256_set1_epi32(-kKeyOne)), _mm256_set1_epi32(kKeyOne));
  const __m256i above_tiny = _mm256_sub_epi32(_mm256_abs_epi32(k), _mm256_set1_epi32(kKeyTiny));
  const __m256i v = _mm256_srli_epi32(_mm256_max_epi32(above_tiny, _mm256_setzero_si256()), kShift);
  const __m256i low = _mm256_and_si256(above_tiny, _mm256_set1_epi32(kOffsetMask));
  const __m256i half = _mm256_set1_epi32(kHalf);
  const __m256i negative = _mm256_cmpgt_epi32(_mm256_setzero_si256(), k);
  const __m256i bucket = _mm256_blendv_epi8(_mm256_add_epi32(half, v), _mm256_sub_epi32(half, v), negative);
  // offset_of: a negative key's low bits count down, 0x7fff - low = low ^ 0x7fff.
  const __m256i offset = _mm256_xor_si256(low, _mm256_and_si256(negative, _mm256_set1_epi32(kOffsetMask)));
  const __m256i e = table8(t.entry, bucket);  // bucket in [0, kBuckets): clamped key
  // A true compare is -1 as an integer: subtracting it adds 1 (offsets and entries are >= 0).
  const __m256i above = _mm256_cmpgt_epi32(_mm256_srli_epi32(e, 8), offset);  // threshold's offset > y's
  __m256i c = _mm256_sub_epi32(_mm256_and_si256(e, _mm256_set1_epi32(0xff)),
                               _mm256_andnot_si256(above, _mm256_set1_epi32(-1)));
  if (t.floor) {  // the folded bucket's floor threshold: +1 where k >= key(FLT_MIN) there
    const __m256i at_floor = _mm256_and_si256(_mm256_cmpeq_epi32(bucket, half),
                                              _mm256_cmpgt_epi32(k, _mm256_set1_epi32(kKeyFloor - 1)));
    c = _mm256_sub_epi32(c, at_floor);
  }
  return _mm256_and_si256(c, _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_ORD_Q)));  // NaN: 0
}

// out[k] = code(x[k] / scale) for k < n: 32 values a round (four code8, packed to bytes).
CPL_TARGET_AVX2 __attribute__((noinline)) inline void codes_avx2(const BucketTable& t, const float* __restrict x,
                                                                 float scale, int64_t n, uint8_t* __restrict out) {
  const __m256 s = _mm256_set1_ps(scale);
  // packus interleaves the 128-bit lanes: dwords come out as a0 b0 c0 d0 a1 b1 c1 d1.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    const __m256i a = code8(t, _mm256_div_ps(_mm256_loadu_ps(x + k), s));
    const __m256i b = code8(t, _mm256_div_ps(_mm256_loadu_ps(x + k + 8), s));
    const __m256i c = code8(t, _mm256_div_ps(_mm256_loadu_ps(x + k + 16), s));
    const __m256i d = code8(t, _mm256_div_ps(_mm256_loadu_ps(x + k + 24), s));
    const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm256_permutevar8x32_epi32(bytes, order));
  }
  for (int64_t j = k; j < n; ++j) out[j] = static_cast<uint8_t>(t.code(x[j] / scale));
}

// out[k] = values[q[k]] * scale for k < n (engine.h dequantize's arithmetic).
CPL_TARGET_AVX2 __attribute__((noinline)) inline void dequantize_avx2(const uint8_t* __restrict q, const float* __restrict values,
                                                                      float scale, int64_t n, float* __restrict out) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k)));
    const __m256 v = _mm256_castsi256_ps(table8(reinterpret_cast<const int32_t*>(values), idx));  // idx < 256
    _mm256_storeu_ps(out + k, _mm256_mul_ps(v, s));
  }
  for (int64_t j = k; j < n; ++j) out[j] = values[q[j]] * scale;
}
#endif

}  // namespace quant8
}  // namespace cpu
}  // namespace cpl
