// The step engine's CPU loop: the CPL rule written ONCE (docs/design.md section 1), generic over a
// Direction (directions.h: how u and the new state follow from g, p and the old state). The
// contract, operation by operation, is cpl_kernels/reference_step.py (_step_one):
//   1. g = grad (fp32), divided by grad_scale when given (kScale)
//   2. skip_nonfinite (kSkip): an element whose g is NaN or inf is left untouched (state included)
//      and counted; g is taken as +0 there so nothing NaN reaches the arithmetic
//   3. D::pre (L2 decay)
//   4. criterion "gradient": conflicting = g*r < 0 on signs; g = +0 there
//   5. D::step: u and the new state, in registers
//   6. criterion "update": conflicting = u*r < 0
//   7. store the state (the old values where g was not finite) and p - lr*u where applied
// Counts per tensor: conflicting (non-finite elements excluded) and non-finite.
//
// Written so GCC vectorises it (simd.h): no branches on data (keep_unless and select_bits are bit
// masks; the non-finite test is one subtract and compare: g - g == 0 is false for NaN and inf), the
// rule, skip and scale as template flags, signs expanded from the 2-bit codes (simd.h: a table, or
// AVX2 shifts and a permute) for a batch of 64 words (1024 lanes) before one long `omp simd` loop,
// and each range compiled twice (baseline x86-64 and the AVX2 clone without FMA, picked at run time).
// Both counts travel in one int32 reduction ((conflicting | non-finite) + (non-finite << 16): at
// most 1024 lanes a batch, so neither field overflows), one vector add per 8 lanes instead of two.
//
// The driver (run_list) parallelises across the whole list: every tensor is cut into segments of
// up to kGrainElements (16-element code words, so a segment starts on a word), consecutive
// segments are packed into tasks of about kGrainElements, and one parallel region runs the tasks,
// each thread taking the next task from a shared counter.
// A Llama model's norm vectors (512 elements) thus share a task with their neighbours instead of
// paying a parallel region each (the pre-engine per-tensor loop measured ~0.06 ms a tensor of
// per-call overhead on a 21-tensor model).
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"
#include "quant8.h"
#include "simd.h"

namespace cpl {
namespace cpu {
namespace engine {

// One entry of the lists, validated by the caller (step.cpp).
struct Entry {
  void* param;
  const void* grad;
  float* state1;          // null where the kind uses fewer slots
  float* state2;
  const uint32_t* codes;  // null: no reference for this tensor
  int64_t numel;
  at::ScalarType dtype;   // of param and grad
  // The 8-bit blockwise state format (cpl::cpl_step_8bit_, docs/design.md section 8; unused and
  // null for fp32 state): per slot, uint8 codes (one per element) and an fp32 absmax per block of
  // kQBlock elements; qmaps: fp32 [2 slots][2 rows: map values, thresholds][256]; tables: per
  // slot, the thresholds as a quant8::BucketTable (built once per call by step.cpp).
  uint8_t* q1 = nullptr;
  float* absmax1 = nullptr;
  uint8_t* q2 = nullptr;
  float* absmax2 = nullptr;
  const float* qmaps = nullptr;
  const quant8::BucketTable* tables = nullptr;
};

// Elements per absmax of the 8-bit format (cpl_kernels/quant8.py BLOCK). kGrainElements and the
// batch of range() are multiples of it, so a block never straddles two segments or batches.
constexpr int64_t kQBlock = 256;
constexpr int64_t kQMapEntries = 256;

// Slot values of one batch from the 8-bit format: qmap[code] * absmax of the block (one fp32
// multiply, as quant8.dequantize). `i` is the batch's first element (a multiple of kQBlock).
CPL_INLINE void dequantize(const uint8_t* __restrict q, const float* __restrict absmax,
                           const float* __restrict values, int64_t i, int64_t lanes, float* __restrict out) {
  for (int64_t b0 = 0; b0 < lanes; b0 += kQBlock) {
    const float scale = absmax[(i + b0) / kQBlock];
    const int64_t nb = std::min(kQBlock, lanes - b0);
#if CPL_HAVE_AVX2_DISPATCH
    if (cpu_has_avx2()) {  // quant8::table8: GCC leaves the table loads scalar
      quant8::dequantize_avx2(q + i + b0, values, scale, nb, out + b0);
      continue;
    }
#endif
#pragma omp simd
    for (int64_t k = 0; k < nb; ++k) out[b0 + k] = values[q[i + b0 + k]] * scale;
  }
}

// The fp32 values of one batch back into the 8-bit format, block by block (quant8.quantize_):
// absmax = max |x| (NaN if the block holds one) clipped at fp32(1e-12); y = x / absmax; the code is
// the number of thresholds <= y (quant8.h's bucket table; NaN y: code 0).
CPL_INLINE void quantize(const float* __restrict in, const quant8::BucketTable& table, int64_t i, int64_t lanes,
                         uint8_t* __restrict q, float* __restrict absmax) {
  constexpr float kFloor = 1e-12f;  // torchao's clip(1e-12), the same fp32 value
  for (int64_t b0 = 0; b0 < lanes; b0 += kQBlock) {
    const int64_t nb = std::min(kQBlock, lanes - b0);
    const float* __restrict x = in + b0;
    float amax = 0.f;
    int nan = 0;
#pragma omp simd reduction(max : amax) reduction(| : nan)
    for (int64_t k = 0; k < nb; ++k) {
      const float a = std::fabs(x[k]);
      amax = std::max(amax, a);
      nan |= static_cast<int>(a != a);
    }
    const float scale = nan ? std::numeric_limits<float>::quiet_NaN() : std::max(amax, kFloor);
    absmax[(i + b0) / kQBlock] = scale;
    uint8_t* __restrict out = q + i + b0;
#if CPL_HAVE_AVX2_DISPATCH
    if (cpu_has_avx2()) {
      quant8::codes_avx2(table, x, scale, nb, out);
      continue;
    }
#endif
#pragma omp simd
    for (int64_t k = 0; k < nb; ++k) out[k] = static_cast<uint8_t>(table.code(x[k] / scale));
  }
}

// Element i of one tensor; returns (conflicting | non-finite) + (non-finite << 16).
template <class D, typename T, int kRule, bool kSkip, bool kScale>
CPL_INLINE int32_t lane(const D& d, T* __restrict param, const T* __restrict grad, float* __restrict s1,
                        float* __restrict s2, int64_t i, int64_t si, float sign, float scale) {
  constexpr bool kGradient = kRule == kGradientStrict || kRule == kGradientSoft;
  const float p = to_f32(param[i]);
  float g = to_f32(grad[i]);
  if constexpr (kScale) g = g / scale;  // a true division, as the reference (_div): no reciprocal
  bool bad = false;
  if constexpr (kSkip) {
    // g - g is +0 for every finite g and NaN for NaN and +-inf: one subtract and one compare
    // against the zero the loop already holds. `!(|g| <= FLT_MAX)` needed two more constants and
    // spilled the Adam scalars (42 instructions a vector iteration instead of 36; AdamW with
    // codes, in L1, 1 core: 1.13 -> 0.88 ns/element; the loop without the test: 0.78).
    bad = !((g - g) == 0.f);
    g = keep_unless(g, bad);
  }
  g = d.pre(g, p);
  bool conflicting = false;
  if constexpr (kGradient) {
    conflicting = conflicts_sign(g, sign);
    g = conflicting ? 0.f : g;  // the state only ever sees collaborative gradient
  }
  float n1 = 0.f, n2 = 0.f;
  if constexpr (D::kStates >= 1) n1 = s1[si];
  if constexpr (D::kStates >= 2) n2 = s2[si];
  const float o1 = n1, o2 = n2;
  const float u = d.step(g, p, n1, n2);
  if constexpr (kRule == kUpdateRule) conflicting = conflicts_sign(u, sign);
  // Unconditional stores of a select: a conditional store would stop the vectoriser (simd.h).
  if constexpr (D::kStates >= 1) s1[si] = kSkip ? select_bits(bad, o1, n1) : n1;
  if constexpr (D::kStates >= 2) s2[si] = kSkip ? select_bits(bad, o2, n2) : n2;
  const bool frozen = (kRule == kGradientSoft ? false : conflicting) | bad;
  store_f32(param, i, p - keep_unless(d.lr * u, frozen));  // p - (+0) is p bit for bit
  // (conflicting | bad) is `frozen` for the strict rules (shared), and minus bad it is the count
  // the contract wants (conflicting, non-finite excluded): range() subtracts.
  return static_cast<int32_t>(conflicting | bad) + (static_cast<int32_t>(bad) << 16);
}

// The 8-bit state format as a wrapper of a direction: run_list<Blockwise8<D>, ...> runs D with
// its state dequantized into a batch buffer, stepped by the same lane(), and requantized.
template <class D>
struct Blockwise8 : D {
  explicit Blockwise8(const D& d) : D(d) {}
};
template <class D>
inline constexpr bool kIsBlockwise8 = false;
template <class D>
inline constexpr bool kIsBlockwise8<Blockwise8<D>> = true;

// Elements [i0, i1) of entry e (i0 a multiple of 16, and of kQBlock for the 8-bit format); adds
// the counts to counts[0], counts[1]. kAvx2: compiled inside range_avx2 (AVX2 sign expansion).
template <class D, typename T, int kRule, bool kSkip, bool kScale, bool kAvx2>
CPL_INLINE void range(const D& d_in, const Entry& e, int64_t i0, int64_t i1, float scale, int64_t* counts) {
  const D d = d_in;  // scalars by value: no aliasing question for the vectoriser
  T* __restrict p = static_cast<T*>(e.param);
  const T* __restrict g = static_cast<const T*>(e.grad);
  constexpr int64_t kBatch = 64 * kCodesPerWord;
  constexpr bool kQ8 = kIsBlockwise8<D>;
  static_assert(kBatch % kQBlock == 0, "a batch holds whole 8-bit blocks");
  alignas(64) float sign[kBatch];
  // 8-bit format: the batch's state, dequantized (stack, 8 KiB); fp32 format: unused.
  alignas(64) float buf1[kQ8 ? kBatch : 1], buf2[kQ8 ? kBatch : 1];
  int64_t conflicting = 0, nonfinite = 0;
  for (int64_t i = i0; i < i1; i += kBatch) {
    const int64_t lanes = std::min(kBatch, i1 - i);
    // State pointers and the index of element i + k in them: the tensor's own fp32 state, or
    // the batch buffer (index k).
    float* __restrict s1 = e.state1;
    float* __restrict s2 = e.state2;
    int64_t base = i;
    if constexpr (kQ8) {
      if constexpr (D::kStates >= 1) dequantize(e.q1, e.absmax1, e.qmaps, i, lanes, buf1);
      if constexpr (D::kStates >= 2) dequantize(e.q2, e.absmax2, e.qmaps + 2 * kQMapEntries, i, lanes, buf2);
      s1 = buf1, s2 = buf2, base = 0;
    }
    int32_t packed = 0;
    if constexpr (kRule == kNoReference) {
#pragma omp simd reduction(+ : packed)
      for (int64_t k = 0; k < lanes; ++k)
        packed += lane<D, T, kRule, kSkip, kScale>(d, p, g, s1, s2, i + k, base + k, 0.f, scale);
    } else {
      // The last word of a tensor may be partial: its unused codes are 0 and never read as lanes.
      const uint32_t* __restrict words = e.codes + i / kCodesPerWord;
      const int64_t nwords = ceil_div(lanes, kCodesPerWord);
      if constexpr (kAvx2) {
        expand_signs_avx2(words, nwords, sign);
      } else {
        for (int64_t w = 0; w < nwords; ++w) expand_signs(words[w], sign + kCodesPerWord * w);
      }
#pragma omp simd reduction(+ : packed)
      for (int64_t k = 0; k < lanes; ++k)
        packed += lane<D, T, kRule, kSkip, kScale>(d, p, g, s1, s2, i + k, base + k, sign[k], scale);
    }
    if constexpr (kQ8) {
      if constexpr (D::kStates >= 1) quantize(buf1, e.tables[0], i, lanes, e.q1, e.absmax1);
      if constexpr (D::kStates >= 2) quantize(buf2, e.tables[1], i, lanes, e.q2, e.absmax2);
    }
    const int32_t bad = packed >> 16;
    conflicting += (packed & 0xFFFF) - bad;
    nonfinite += bad;
  }
  counts[0] += conflicting;
  counts[1] += nonfinite;
}

template <class D>
using RangeFn = void (*)(const D&, const Entry&, int64_t, int64_t, float, int64_t*);

template <class D, typename T, int kRule, bool kSkip, bool kScale>
void range_base(const D& d, const Entry& e, int64_t i0, int64_t i1, float scale, int64_t* counts) {
  range<D, T, kRule, kSkip, kScale, false>(d, e, i0, i1, scale, counts);
}

template <class D, typename T, int kRule, bool kSkip, bool kScale>
CPL_TARGET_AVX2 void range_avx2(const D& d, const Entry& e, int64_t i0, int64_t i1, float scale, int64_t* counts) {
  range<D, T, kRule, kSkip, kScale, true>(d, e, i0, i1, scale, counts);
}

template <class D, typename T, bool kSkip, bool kScale>
RangeFn<D> pick_rule(int rule, bool avx2) {
  switch (rule) {
    case kUpdateRule:
      return avx2 ? &range_avx2<D, T, kUpdateRule, kSkip, kScale> : &range_base<D, T, kUpdateRule, kSkip, kScale>;
    case kGradientStrict:
      return avx2 ? &range_avx2<D, T, kGradientStrict, kSkip, kScale>
                  : &range_base<D, T, kGradientStrict, kSkip, kScale>;
    case kGradientSoft:
      return avx2 ? &range_avx2<D, T, kGradientSoft, kSkip, kScale> : &range_base<D, T, kGradientSoft, kSkip, kScale>;
    default:
      return avx2 ? &range_avx2<D, T, kNoReference, kSkip, kScale> : &range_base<D, T, kNoReference, kSkip, kScale>;
  }
}

// The kernel for one entry: its dtype and whether it has codes are per tensor; D, skip and scale
// are per call.
template <class D, bool kSkip, bool kScale>
RangeFn<D> pick(at::ScalarType dtype, int rule, bool avx2) {
  switch (dtype) {
    case at::kBFloat16: return pick_rule<D, c10::BFloat16, kSkip, kScale>(rule, avx2);
    case at::kHalf: return pick_rule<D, c10::Half, kSkip, kScale>(rule, avx2);
    default: return pick_rule<D, float, kSkip, kScale>(rule, avx2);
  }
}

// Runs direction d over every entry; counts[k] and counts[n + k] (n entries: the rows of the op's
// int64 [2, n] result) receive entry k's conflicting and non-finite counts. `rule` is the Rule (simd.h) for entries with codes.
template <class D, bool kSkip, bool kScale>
void run_list(const D& d, const std::vector<Entry>& entries, int rule_with_codes, float scale, int64_t* counts) {
  struct Segment {
    RangeFn<D> fn;
    const Entry* entry;
    int64_t i0, i1;
    int64_t counts[2];
  };
  const bool avx2 = cpu_has_avx2();
  std::vector<Segment> segments;
  std::vector<int64_t> task_start{0};  // task t runs segments [task_start[t], task_start[t + 1])
  int64_t in_task = 0;
  for (const Entry& e : entries) {
    const RangeFn<D> fn = pick<D, kSkip, kScale>(e.dtype, e.codes ? rule_with_codes : kNoReference, avx2);
    for (int64_t i0 = 0; i0 < e.numel; i0 += kGrainElements) {
      const int64_t i1 = std::min(e.numel, i0 + kGrainElements);  // kGrainElements: a multiple of 16
      segments.push_back(Segment{fn, &e, i0, i1, {0, 0}});
      in_task += i1 - i0;
      if (in_task >= kGrainElements) {
        task_start.push_back(static_cast<int64_t>(segments.size()));
        in_task = 0;
      }
    }
  }
  if (in_task > 0) task_start.push_back(static_cast<int64_t>(segments.size()));
  const int64_t tasks = static_cast<int64_t>(task_start.size()) - 1;
  const auto run = [&](int64_t t0, int64_t t1) {
    for (int64_t s = task_start[t0]; s < task_start[t1]; ++s) {
      Segment& seg = segments[s];
      seg.fn(d, *seg.entry, seg.i0, seg.i1, scale, seg.counts);
    }
  };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  if (threads <= 1) {
    run(0, tasks);  // one task or one thread: no parallel region (its start costs ~2 us a call)
  } else {
    // Tasks are taken from a shared counter, not split statically: on this shared 2-core
    // machine a thread is often descheduled mid-step, and a static half then waits for it.
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < tasks;
           t = next.fetch_add(1, std::memory_order_relaxed))
        run(t, t + 1);
    });
  }
  for (const Segment& seg : segments) {
    const int64_t k = seg.entry - entries.data();
    counts[k] += seg.counts[0];
    counts[static_cast<int64_t>(entries.size()) + k] += seg.counts[1];
  }
}

}  // namespace engine
}  // namespace cpu
}  // namespace cpl
