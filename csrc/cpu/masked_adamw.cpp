// Compact-state AdamW: m and v exist only for active elements (docs/design.md section 1).
// Storage invariant: block_offsets[b] = active elements before element b*1024, and exp_avg /
// exp_avg_sq hold one entry per active element in element order, so the compact index of an
// active element is block_offsets[b] + (active bits before it within its block).
//
// Each active element takes the step engine's AdamW step without a reference: engine.h's `lane`
// (the CPL rule written once: GradScaler's unscale, the non-finite skip and its count) around
// directions.h's AdamDirection, so MaskedAdamW and CPLAdamW cannot drift apart.
//
// Per 1024-element block: an empty block is skipped (row-structured masks skip whole rows and
// never touch their lines); a full block runs the lanes in place, as the engine, and so does each
// run of all-active words of a block whose words are all-active or all-inactive (whole rows); any
// other mixed block packs its active p and g into compact fp32 buffers, runs the lanes on the
// buffers and the compact m, v (contiguous), and expands p back.
//   AVX2 (picked at run time): 8 elements at a time, left-packed by one vpermps through a
//   permutation table indexed by the mask byte, and expanded by the inverse permutation and a
//   blend, so no loop per set bit remains. The first version listed set bits by ctz and
//   gathered/scattered one element each (with a scalar AdamW per bit before that): 16M fp32 at
//   30% random active took 1.66-2.31x torch's fused AdamW on all 16M elements (issue 12).
//   Baseline x86-64: the ctz list and a scalar gather/scatter (no vector permute there).
// Physical bytes at a random 30% mask: every cache line of p and g holds an active element
// (0.7^16 = 0.3% do not), so p is read and written and g read in full (12 B/param), plus m, v
// 0.3 * 16 B and the mask 0.125 B: ~17 B/param against AdamW's 28, so ~0.6x its time is the
// bandwidth floor for random masks. Row-structured masks move 0.3 * 28 B.
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "common.h"
#include "compact_state.h"
#include "directions.h"
#include "engine.h"
#include "ops.h"
#include "simd.h"

namespace cpl {
namespace cpu {

namespace {

template <class D>
struct MaskedArgs {
  void* param;
  const void* grad;
  const uint32_t* mask;
  const int64_t* offsets;
  float* m;
  float* v;
  int64_t n;
  D d;
  float scale;
};

// The engine's lane over `count` elements of fp32 arrays (compact buffers, or a block in place
// for fp32); returns the non-finite count. At most 1024 lanes: the packed int32 reduction of
// engine.h (low field: frozen = non-finite here, high field: non-finite) cannot overflow.
template <class D, typename T, bool kSkip, bool kScale>
CPL_INLINE int64_t run_lanes(const D& d_in, T* __restrict p, const T* __restrict g, float* __restrict m,
                             float* __restrict v, int64_t count, float scale) {
  const D d = d_in;  // scalars by value, as engine.h's range: no aliasing question for the vectoriser
  int32_t packed = 0;
#pragma omp simd reduction(+ : packed)
  for (int64_t k = 0; k < count; ++k)
    packed += engine::lane<D, T, kNoReference, kSkip, kScale>(d, p, g, m, v, k, k, 0.f, scale);
  return packed >> 16;
}

// Compact buffers of one mixed block: 8 lanes of slack, as the AVX2 pack stores 8 lanes at the
// running count and the expand loads 8 (lanes past the count are never used).
struct Compact {
  alignas(64) float p[kOffsetBlock + 8];
  alignas(64) float g[kOffsetBlock + 8];
};

// Baseline mixed block: the set bits listed by ctz, gathered, stepped, scattered.
template <class D, typename T, bool kSkip, bool kScale>
CPL_INLINE int64_t mixed_block_scalar(const MaskedArgs<D>& a, int64_t b, int64_t count, Compact& c) {
  T* __restrict p = static_cast<T*>(a.param);
  const T* __restrict g = static_cast<const T*>(a.grad);
  const int64_t base = b * kOffsetBlock, j0 = a.offsets[b];
  const int64_t words = ceil_div(a.n, kBitsPerWord);
  const int64_t w0 = b * kWordsPerBlock, w1 = std::min(words, w0 + kWordsPerBlock);
  alignas(64) uint16_t idx[kOffsetBlock];
  int64_t k = 0;
  for (int64_t w = w0; w < w1; ++w)
    for (uint32_t bits = a.mask[w]; bits != 0; bits &= bits - 1)
      idx[k++] = static_cast<uint16_t>((w - w0) * kBitsPerWord + __builtin_ctz(bits));
  for (int64_t i = 0; i < count; ++i) {
    c.p[i] = to_f32(p[base + idx[i]]);
    c.g[i] = to_f32(g[base + idx[i]]);
  }
  const int64_t bad = run_lanes<D, float, kSkip, kScale>(a.d, c.p, c.g, a.m + j0, a.v + j0, count, a.scale);
  for (int64_t i = 0; i < count; ++i) store_f32(p, base + idx[i], c.p[i]);
  return bad;
}

#if CPL_HAVE_AVX2_DISPATCH
#define CPL_AVX2_INLINE inline __attribute__((always_inline, target("avx2")))

// For each mask byte: `pack` holds, nibble by nibble, the lanes of its set bits in order (the
// vpermps indices that left-pack them); `expand` holds, at the nibble of each set bit, its rank
// among the set bits (the indices that put packed lane r back at its element). 256 x 2 x 4 B.
struct PermTables {
  uint32_t pack[256];
  uint32_t expand[256];
  uint8_t count[256];
  constexpr PermTables() : pack{}, expand{}, count{} {
    for (int byte = 0; byte < 256; ++byte) {
      uint32_t rank = 0;
      for (int lane = 0; lane < 8; ++lane)
        if ((byte >> lane) & 1) {
          pack[byte] |= static_cast<uint32_t>(lane) << (4 * rank);
          expand[byte] |= rank << (4 * lane);
          ++rank;
        }
      count[byte] = static_cast<uint8_t>(rank);
    }
  }
};
inline constexpr PermTables kPerm{};

// The 8 vpermps indices held in the nibbles of x (vpermps reads the low 3 bits of each).
CPL_AVX2_INLINE __m256i nibble_indices(uint32_t x) {
  return _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(x)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
}

// All ones in lane k where bit k of `byte` is set.
CPL_AVX2_INLINE __m256i lane_mask(uint32_t byte) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(byte)), bit), bit);
}

template <typename T>
CPL_AVX2_INLINE __m256 load8(const T* x) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(x);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // widening is a shift: exact
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  } else {
    alignas(32) float f[8];
    for (int k = 0; k < 8; ++k) f[k] = to_f32(x[k]);
    return _mm256_load_ps(f);
  }
}

// x[k] to element k where bit k of `byte` is set; the other elements keep their bits.
template <typename T>
CPL_AVX2_INLINE void store8_where(T* out, __m256 x, uint32_t byte) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(out, _mm256_blendv_ps(_mm256_loadu_ps(out), x, _mm256_castsi256_ps(lane_mask(byte))));
  } else {
    alignas(32) float f[8];
    _mm256_store_ps(f, x);
    uint16_t raw[8];
    std::memcpy(raw, out, sizeof raw);
    for (int k = 0; k < 8; ++k) {
      uint16_t fresh;
      const T y = from_f32(f[k], static_cast<T*>(nullptr));
      std::memcpy(&fresh, &y, sizeof fresh);
      const uint16_t keep = static_cast<uint16_t>(((byte >> k) & 1u) - 1u);  // inactive: all ones
      raw[k] = static_cast<uint16_t>((raw[k] & keep) | (fresh & ~keep));
    }
    std::memcpy(out, raw, sizeof raw);
  }
}

// AVX2 mixed block: left-pack 8 elements per mask byte, step the compact buffers, expand back.
// A word with no set bit is skipped in both passes (row masks: half-active blocks leave their
// inactive lines alone). Elements past n exist only in the last group of the last block: that
// group goes element by element (its bits past n are 0, checked before the step).
// A call, not inlined: the block loop that calls it is compiled for both targets, and GCC does not
// inline a target("avx2") function into a baseline one (one call per 1024-element block).
template <class D, typename T, bool kSkip, bool kScale>
__attribute__((noinline, target("avx2"))) int64_t mixed_block_avx2(const MaskedArgs<D>& a, int64_t b, int64_t count,
                                                                   Compact& c) {
  // Everything in locals: the stores into the compact buffers could otherwise alias `a`, and GCC
  // reloaded a.n and a.mask after every store (perf: the pack and expand loops took 70% of the
  // block's time against ~30% for the AdamW lanes).
  T* __restrict p = static_cast<T*>(a.param);
  const T* __restrict g = static_cast<const T*>(a.grad);
  const uint32_t* __restrict mask = a.mask;
  float* __restrict cp = c.p;
  float* __restrict cg = c.g;
  const int64_t n = a.n, j0 = a.offsets[b];
  const int64_t w0 = b * kWordsPerBlock, w1 = std::min(ceil_div(n, kBitsPerWord), w0 + kWordsPerBlock);
  // Groups of 8 from element `full_end` on run past n (the last block's tail): element by element.
  const int64_t full_end = n & ~int64_t{7};
  int64_t k = 0;
  for (int64_t w = w0; w < w1; ++w) {
    const uint32_t word = mask[w];
    if (word == 0) continue;
    for (int q = 0; q < 4; ++q) {
      const uint32_t byte = (word >> (8 * q)) & 255u;
      const int64_t e = w * kBitsPerWord + 8 * q;
      if (e < full_end) {
        const __m256i idx = nibble_indices(kPerm.pack[byte]);
        _mm256_storeu_ps(cp + k, _mm256_permutevar8x32_ps(load8(p + e), idx));
        _mm256_storeu_ps(cg + k, _mm256_permutevar8x32_ps(load8(g + e), idx));
      } else {
        int64_t r = k;
        for (int lane = 0; lane < 8; ++lane)
          if ((byte >> lane) & 1u) cp[r] = to_f32(p[e + lane]), cg[r++] = to_f32(g[e + lane]);
      }
      k += kPerm.count[byte];
    }
  }
  const int64_t bad = run_lanes<D, float, kSkip, kScale>(a.d, cp, cg, a.m + j0, a.v + j0, count, a.scale);
  k = 0;
  for (int64_t w = w0; w < w1; ++w) {
    const uint32_t word = mask[w];
    if (word == 0) continue;
    for (int q = 0; q < 4; ++q) {
      const uint32_t byte = (word >> (8 * q)) & 255u;
      const int64_t e = w * kBitsPerWord + 8 * q;
      if (e < full_end) {
        const __m256 x = _mm256_permutevar8x32_ps(_mm256_loadu_ps(cp + k), nibble_indices(kPerm.expand[byte]));
        store8_where(p + e, x, byte);
      } else {
        int64_t r = k;
        for (int lane = 0; lane < 8; ++lane)
          if ((byte >> lane) & 1u) store_f32(p, e + lane, cp[r++]);
      }
      k += kPerm.count[byte];
    }
  }
  return bad;
}
#endif

// Every mask word of block b all-active or all-inactive (whole rows of a multiple of 32 elements
// active, as the row masks of cpl_kernels.masks), so its active elements are runs of whole words.
CPL_INLINE bool whole_words(const uint32_t* mask, int64_t words, int64_t b) {
  const int64_t w0 = b * kWordsPerBlock, w1 = std::min(words, w0 + kWordsPerBlock);
  uint32_t mixed = 0;
#pragma omp simd reduction(| : mixed)
  for (int64_t w = w0; w < w1; ++w) mixed |= static_cast<uint32_t>(mask[w] + 1u > 1u);  // neither 0 nor ~0
  return mixed == 0;
}

// A block of whole-word runs: each run stepped in place on p, g and its contiguous compact m, v,
// with no pack and no expand. Row masks of 512-element rows make ~42% of blocks half active at
// 30% of rows (16M Llama shapes, 2 threads, MaskedAdamW.step beside torch's fused AdamW in one
// run, 2 runs: 13.6-13.9 -> 11.7-12.2 ms).
template <class D, typename T, bool kSkip, bool kScale>
CPL_INLINE int64_t word_runs(const MaskedArgs<D>& a, int64_t b) {
  T* __restrict p = static_cast<T*>(a.param);
  const T* __restrict g = static_cast<const T*>(a.grad);
  const int64_t words = ceil_div(a.n, kBitsPerWord);
  const int64_t w0 = b * kWordsPerBlock, w1 = std::min(words, w0 + kWordsPerBlock);
  int64_t j = a.offsets[b], bad = 0;
  for (int64_t w = w0; w < w1;) {
    if (a.mask[w] == 0) {
      ++w;
      continue;
    }
    int64_t end = w + 1;
    while (end < w1 && a.mask[end] != 0) ++end;
    // A whole active word lies inside n (no bit is set past n: check_compact_state).
    const int64_t e = w * kBitsPerWord, len = (end - w) * kBitsPerWord;
    bad += run_lanes<D, T, kSkip, kScale>(a.d, p + e, g + e, a.m + j, a.v + j, len, a.scale);
    j += len;
    w = end;
  }
  return bad;
}

// Blocks [b0, b1); returns their non-finite count.
template <class D, typename T, bool kSkip, bool kScale, bool kAvx2>
CPL_INLINE int64_t masked_blocks(const MaskedArgs<D>& a, int64_t b0, int64_t b1) {
  T* __restrict p = static_cast<T*>(a.param);
  const T* __restrict g = static_cast<const T*>(a.grad);
  const int64_t words = ceil_div(a.n, kBitsPerWord);
  Compact c;
  int64_t bad = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t count = block_popcount(a.mask, words, b);
    if (count == 0) continue;
    // check_compact_state ran first: [j0, j0 + count) lies inside [0, active).
    const int64_t base = b * kOffsetBlock, j0 = a.offsets[b];
    if (count == kOffsetBlock) {  // fully active (a full block lies inside n): in place
      bad += run_lanes<D, T, kSkip, kScale>(a.d, p + base, g + base, a.m + j0, a.v + j0, kOffsetBlock, a.scale);
      continue;
    }
    if (whole_words(a.mask, words, b)) {  // row-structured: each run of active words in place
      bad += word_runs<D, T, kSkip, kScale>(a, b);
      continue;
    }
#if CPL_HAVE_AVX2_DISPATCH
    if constexpr (kAvx2) {
      bad += mixed_block_avx2<D, T, kSkip, kScale>(a, b, count, c);
      continue;
    }
#endif
    bad += mixed_block_scalar<D, T, kSkip, kScale>(a, b, count, c);
  }
  return bad;
}

template <class D, typename T, bool kSkip, bool kScale>
int64_t masked_blocks_base(const MaskedArgs<D>& a, int64_t b0, int64_t b1) {
  return masked_blocks<D, T, kSkip, kScale, false>(a, b0, b1);
}

template <class D, typename T, bool kSkip, bool kScale>
CPL_TARGET_AVX2 int64_t masked_blocks_avx2(const MaskedArgs<D>& a, int64_t b0, int64_t b1) {
  return masked_blocks<D, T, kSkip, kScale, true>(a, b0, b1);
}

// All blocks, in parallel; returns the non-finite count. Tasks of kGrainElements (64 blocks) are
// taken from a shared counter, as engine.h's run_list does: on this shared 2-core machine a
// thread is often descheduled mid-step, and a static half then waits for it.
template <class D, typename T, bool kSkip, bool kScale>
int64_t masked_step(const MaskedArgs<D>& a) {
  const int64_t blocks = ceil_div(a.n, kOffsetBlock);
  const int64_t per_task = std::max<int64_t>(1, kGrainElements / kOffsetBlock);
  const int64_t tasks = ceil_div(blocks, per_task);
  const bool avx2 = cpu_has_avx2();
  const auto run = [&](int64_t t) {
    const int64_t b0 = t * per_task, b1 = std::min(blocks, b0 + per_task);
    return avx2 ? masked_blocks_avx2<D, T, kSkip, kScale>(a, b0, b1) : masked_blocks_base<D, T, kSkip, kScale>(a, b0, b1);
  };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  if (threads <= 1) {  // one task or one thread: no parallel region (its start costs ~2 us a call)
    int64_t bad = 0;
    for (int64_t t = 0; t < tasks; ++t) bad += run(t);
    return bad;
  }
  std::atomic<int64_t> next{0}, bad{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    int64_t mine = 0;
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < tasks; t = next.fetch_add(1, std::memory_order_relaxed))
      mine += run(t);
    bad.fetch_add(mine, std::memory_order_relaxed);
  });
  return bad.load();
}

double host_value(const std::optional<at::Tensor>& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t->numel() == 1 && t->is_floating_point(), "cpl.", op, ": argument '", name,
                    "' must be a one-element floating-point tensor");
  TORCH_CHECK_VALUE(t->device().is_cpu(), "cpl.", op, ": argument '", name, "' is on ", t->device(),
                    " but the CPU kernel reads it on the host");
  return t->item<double>();
}

}  // namespace

at::Tensor masked_adamw_step_(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& mask_words,
                              const at::Tensor& block_offsets, const at::Tensor& exp_avg,
                              const at::Tensor& exp_avg_sq, double step, double lr, double beta1, double beta2,
                              double eps, double weight_decay, bool skip_nonfinite,
                              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const char* op = "masked_adamw_step_";
  check_float_param(param, op, "param");
  const int64_t n = param.numel();
  check_exact(grad, op, "grad", param.scalar_type(), n);
  check_exact(mask_words, op, "mask_words", at::kInt, ceil_div(n, kBitsPerWord));
  check_exact(block_offsets, op, "block_offsets", at::kLong, ceil_div(n, kOffsetBlock));
  const int64_t active = exp_avg.numel();
  check_exact(exp_avg, op, "exp_avg", at::kFloat, active);
  check_exact(exp_avg_sq, op, "exp_avg_sq", at::kFloat, active);
  TORCH_CHECK_VALUE(std::isfinite(step) && step >= 1, "cpl.", op, ": argument 'step' counts from 1, got ", step);
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0, "cpl.", op, ": argument 'lr' must be a finite number >= 0, got ", lr);
  for (const auto& [name, value, upper] : {std::tuple<const char*, double, double>{"beta1", beta1, 1.0},
                                            {"beta2", beta2, 1.0}, {"eps", eps, INFINITY},
                                            {"weight_decay", weight_decay, INFINITY}})
    TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0 && value < upper, "cpl.", op, ": argument '", name,
                      "' must be a finite number in [0, ", upper, "), got ", value);
  std::optional<float> scale;
  if (grad_scale.has_value() && grad_scale->defined())
    scale = static_cast<float>(host_value(grad_scale, op, "grad_scale"));  // rounded once, as the reference
  const bool skip_all = found_inf.has_value() && found_inf->defined() && host_value(found_inf, op, "found_inf") != 0.0;

  const uint32_t* mask = reinterpret_cast<const uint32_t*>(mask_words.const_data_ptr<int32_t>());
  // Before any write: afterwards the kernel can trust every set bit (a block with 1024 set bits
  // lies inside n) and every compact index (inside [0, active)).
  check_compact_state(mask, block_offsets.const_data_ptr<int64_t>(), n, active, op);
  at::Tensor nonfinite = at::zeros({}, at::kLong);
  if (skip_all || active == 0) return nonfinite;  // GradScaler's found_inf: nothing written

  const double hyper[4] = {beta1, beta2, eps, weight_decay};
  int64_t bad = 0;
  kinds::AdamW::visit(hyper, step, lr, [&](const auto& d) {
    using D = std::decay_t<decltype(d)>;
    const MaskedArgs<D> a{param.data_ptr(), grad.const_data_ptr(), mask, block_offsets.const_data_ptr<int64_t>(),
                          exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), n, d, scale.value_or(1.f)};
    CPL_DISPATCH_PARAM_TYPES(param.scalar_type(), op, [&] {
      if (skip_nonfinite) {
        bad = scale ? masked_step<D, scalar_t, true, true>(a) : masked_step<D, scalar_t, true, false>(a);
      } else {
        bad = scale ? masked_step<D, scalar_t, false, true>(a) : masked_step<D, scalar_t, false, false>(a);
      }
    });
  });
  nonfinite.fill_(bad);
  return nonfinite;
}

}  // namespace cpu
}  // namespace cpl
