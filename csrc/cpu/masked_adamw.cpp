// Compact-state AdamW: m and v exist only for active elements (docs/design.md section 1).
// Storage invariant: block_offsets[b] = active elements before element b*1024, and exp_avg /
// exp_avg_sq hold one entry per active element in element order, so the compact index of an
// active element is block_offsets[b] + (active bits before it within its block).
//
// Per 1024-element block: an empty block is skipped (row-structured masks skip whole rows); a full
// block runs the dense vector loop; a mixed block lists its active elements (ctz over the mask
// words), gathers p and g into compact buffers, runs the vector loop on the compact m, v and
// scatters p back. The first version ran the AdamW math per set bit, scalar, inside the ctz loop
// (with a bounds check per element): at 30% random active on 16M fp32 that took about as long as
// torch's fused AdamW on all 16M elements. After (16M fp32, op level, loaded 2-core machine):
// 30% rows 16 ms vs fused AdamW 32 ms (0.5x); 10% and 30% random both ~36 ms on one thread, so
// the per-block list/gather/scatter work, not the bytes, bounds random masks (report: 0.97x).
// Physical bytes at a random 30% mask: every cache line of p and g holds an active element
// (0.7^16 = 0.3% do not), so p is read and written and g read in full (12 B/param), plus m, v
// 0.3 * 16 B and the mask 0.125 B: ~17 B/param against AdamW's 28, so ~0.6x its time is the
// bandwidth floor for random masks. Row-structured masks move 0.3 * 28 B.
#include <cmath>

#include "adam_math.h"
#include "common.h"
#include "simd.h"

namespace cpl {
namespace cpu {

namespace {

CPL_INLINE float masked_update(float p, float g, float* __restrict m, float* __restrict v, int64_t j,
                               const AdamHyper& h) {
  return p - h.lr * (adam_direction(g, m, v, j, h) + h.weight_decay * p);
}

// Set bits of a word by SWAR bit tricks: vectorises, where __builtin_popcount in the baseline
// x86-64 build (no POPCNT instruction) is a libgcc call per word.
CPL_INLINE uint32_t popcount32(uint32_t x) {
  x = x - ((x >> 1) & 0x55555555u);
  x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
  x = (x + (x >> 4)) & 0x0F0F0F0Fu;
  x += x >> 8;
  x += x >> 16;
  return x & 0x3Fu;
}

// Active elements of 1024-element block b.
CPL_INLINE int64_t block_popcount(const uint32_t* mask, int64_t words, int64_t b) {
  constexpr int64_t kWordsPerBlock = kOffsetBlock / kBitsPerWord;
  const int64_t w0 = b * kWordsPerBlock, w1 = std::min(words, w0 + kWordsPerBlock);
  uint32_t count = 0;
#pragma omp simd reduction(+ : count)
  for (int64_t w = w0; w < w1; ++w) count += popcount32(mask[w]);
  return count;
}

template <typename T>
struct MaskedArgs {
  T* param;
  const T* grad;
  const uint32_t* mask;
  const int64_t* offsets;
  float* m;
  float* v;
  int64_t n, active;
  AdamHyper h;
};

// Blocks [b0, b1).
template <typename T>
CPL_INLINE void masked_blocks(const MaskedArgs<T>& a, int64_t b0, int64_t b1) {
  T* __restrict p = a.param;
  const T* __restrict g = a.grad;
  float* __restrict m = a.m;
  float* __restrict v = a.v;
  const AdamHyper h = a.h;
  constexpr int64_t kWordsPerBlock = kOffsetBlock / kBitsPerWord;
  const int64_t words = ceil_div(a.n, kBitsPerWord);
  alignas(64) uint16_t idx[kOffsetBlock];
  alignas(64) float pc[kOffsetBlock], gc[kOffsetBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t j0 = a.offsets[b], base = b * kOffsetBlock;
    const int64_t w0 = b * kWordsPerBlock, w1 = std::min(words, w0 + kWordsPerBlock);
    const int64_t count = block_popcount(a.mask, words, b);
    if (count == 0) continue;
    // check_compact_state ran first: [j0, j0 + count) lies inside [0, active).
    if (count == kOffsetBlock) {  // fully active (a full block lies inside n)
#pragma omp simd
      for (int64_t k = 0; k < kOffsetBlock; ++k)
        store_f32(p, base + k, masked_update(to_f32(p[base + k]), to_f32(g[base + k]), m, v, j0 + k, h));
      continue;
    }
    int64_t c = 0;
    for (int64_t w = w0; w < w1; ++w)
      for (uint32_t bits = a.mask[w]; bits != 0; bits &= bits - 1)
        idx[c++] = static_cast<uint16_t>((w - w0) * kBitsPerWord + __builtin_ctz(bits));
    for (int64_t k = 0; k < count; ++k) {
      pc[k] = to_f32(p[base + idx[k]]);
      gc[k] = to_f32(g[base + idx[k]]);
    }
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) pc[k] = masked_update(pc[k], gc[k], m, v, j0 + k, h);
    for (int64_t k = 0; k < count; ++k) store_f32(p, base + idx[k], pc[k]);
  }
}

template <typename T>
void masked_blocks_base(const MaskedArgs<T>& a, int64_t b0, int64_t b1) { masked_blocks(a, b0, b1); }

template <typename T>
CPL_TARGET_AVX2 void masked_blocks_avx2(const MaskedArgs<T>& a, int64_t b0, int64_t b1) { masked_blocks(a, b0, b1); }

// Entry b of block_offsets is wrong: out of [0, active], not 0 at b == 0, or not the previous
// entry plus the previous block's popcount (`prev_count`). Every comparison is between values in
// [0, active + 1024], so nothing overflows whatever the offsets hold.
inline bool entry_bad(const int64_t* off, int64_t b, int64_t prev_count, int64_t active) {
  const int64_t x = off[b];
  if (x < 0 || x > active) return true;
  if (b == 0) return x != 0;
  const int64_t prev = off[b - 1];
  return prev < 0 || prev > active || x != prev + prev_count;
}

// The message for the first violation, in the order (and wording) of the Python backends' check
// (cpl_kernels/_checks.py compact_state). Runs only when the parallel pass found one.
[[noreturn]] void compact_state_error(const uint32_t* mask, const int64_t* off, int64_t n, int64_t active,
                                      const char* op) {
  const int64_t words = ceil_div(n, kBitsPerWord), blocks = ceil_div(n, kOffsetBlock);
  TORCH_CHECK_VALUE(n % kBitsPerWord == 0 || (mask[n / kBitsPerWord] >> (n % kBitsPerWord)) == 0u, "cpl.", op,
                    ": argument 'mask_words' has bits set past the last of the ", n, " elements");
  int64_t prev_count = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t x = off[b];
    TORCH_CHECK_VALUE(x >= 0, "cpl.", op, ": argument 'block_offsets' has a negative entry: block_offsets[", b,
                      "] = ", x);
    TORCH_CHECK_VALUE(x <= active, "cpl.", op, ": argument 'block_offsets' entry block_offsets[", b, "] = ", x,
                      " exceeds the ", active, " entries of 'exp_avg'");
    TORCH_CHECK_VALUE(b > 0 || x == 0, "cpl.", op, ": argument 'block_offsets' must start at 0, got block_offsets[0] = ", x);
    if (b > 0) {
      const int64_t prev = off[b - 1];
      TORCH_CHECK_VALUE(x >= prev, "cpl.", op, ": argument 'block_offsets' decreases at block ", b, ": block_offsets[",
                        b, "] = ", x, " < block_offsets[", b - 1, "] = ", prev);
      TORCH_CHECK_VALUE(x == prev + prev_count, "cpl.", op, ": argument 'block_offsets' does not match 'mask_words' at block ",
                        b, ": block_offsets[", b, "] = ", x, ", but block_offsets[", b - 1, "] = ", prev, " plus the ",
                        prev_count, " active elements of block ", b - 1, " make ", prev + prev_count);
    }
    prev_count = block_popcount(mask, words, b);
  }
  const int64_t last = blocks - 1, total = off[last] + prev_count;
  TORCH_CHECK_VALUE(false, "cpl.", op, ": argument 'exp_avg' has ", active, " entries but the mask has ", total,
                    " active elements (block_offsets[", last, "] = ", off[last], " plus the ", prev_count, " of block ",
                    last, "); the compact state needs exactly one entry per active element");
}

}  // namespace

// Validation pre-pass (docs/design.md section 3): every compact index the step will form,
// block_offsets[b] + (active bits before the element in block b), must lie in [0, active). That
// holds iff no mask bit is set past n, block_offsets[0] == 0, block_offsets[b+1] ==
// block_offsets[b] + popcount(block b), and the last offset plus its block's popcount == active.
// Checked here before anything is written, whatever the Python layer checked: a negative offset
// used to write 64 floats before exp_avg (heap corruption, abort at exit). The pass reads only
// the mask words and the offsets, 0.125 + 0.008 = 0.13 B per param against the step's >= 12 B
// (p, g and the active m, v): negligible. Measured (16M fp32, one thread, CPU time): an empty
// mask, i.e. this pass plus the kernel's own per-block popcounts, 0.5 ms; the full step at 30%
// active 11 ms (row-structured) and 32 ms (random). Blocks run in parallel; the first bad entry
// (lowest index, so the message does not depend on the thread count) is reported by a serial
// rerun.
void check_compact_state(const uint32_t* mask, const int64_t* off, int64_t n, int64_t active, const char* op) {
  const int64_t words = ceil_div(n, kBitsPerWord), blocks = ceil_div(n, kOffsetBlock);
  if (blocks == 0) {
    TORCH_CHECK_VALUE(active == 0, "cpl.", op, ": argument 'exp_avg' has ", active,
                      " entries but an empty 'param' has no active elements");
    return;
  }
  bool bad = n % kBitsPerWord != 0 && (mask[n / kBitsPerWord] >> (n % kBitsPerWord)) != 0u;
  if (!bad) {
    // Each task returns its first bad entry, `blocks` when only the total is wrong, or `none`.
    // 1024 blocks (1M elements, 128 KiB of mask) per task: a block costs ~32 popcounts, so
    // smaller tensors are checked on one thread rather than paying the OpenMP start (~2 us).
    const int64_t none = blocks + 1;
    const int64_t first = at::parallel_reduce(
        0, blocks, 1024, none,
        [&](int64_t b0, int64_t b1, int64_t) {
          int64_t prev_count = b0 > 0 ? block_popcount(mask, words, b0 - 1) : 0;
          for (int64_t b = b0; b < b1; ++b) {
            if (entry_bad(off, b, prev_count, active)) return b;
            prev_count = block_popcount(mask, words, b);
          }
          // off[blocks - 1] passed entry_bad, so it lies in [0, active]: no overflow.
          if (b1 == blocks && off[blocks - 1] + prev_count != active) return blocks;
          return none;
        },
        [](int64_t x, int64_t y) { return std::min(x, y); });
    bad = first != none;
  }
  if (bad) compact_state_error(mask, off, n, active, op);
}

void check_compact_state(const at::Tensor& mask_words, const at::Tensor& block_offsets, int64_t numel,
                         int64_t state_len, const char* op) {
  check_exact(mask_words, op, "mask_words", at::kInt, ceil_div(numel, kBitsPerWord));
  check_exact(block_offsets, op, "block_offsets", at::kLong, ceil_div(numel, kOffsetBlock));
  check_compact_state(reinterpret_cast<const uint32_t*>(mask_words.const_data_ptr<int32_t>()),
                      block_offsets.const_data_ptr<int64_t>(), numel, state_len, op);
}

void masked_adamw_step_(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& mask_words,
                        const at::Tensor& block_offsets, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_sq, double step, double lr, double beta1,
                        double beta2, double eps, double weight_decay) {
  const char* op = "masked_adamw_step_";
  check_float_param(param, op, "param");
  const int64_t n = param.numel();
  check_exact(grad, op, "grad", param.scalar_type(), n);
  check_exact(mask_words, op, "mask_words", at::kInt, ceil_div(n, kBitsPerWord));
  const int64_t blocks = ceil_div(n, kOffsetBlock);
  check_exact(block_offsets, op, "block_offsets", at::kLong, blocks);
  const int64_t active = exp_avg.numel();
  check_exact(exp_avg, op, "exp_avg", at::kFloat, active);
  check_exact(exp_avg_sq, op, "exp_avg_sq", at::kFloat, active);
  TORCH_CHECK(step >= 1, "cpl.", op, ": argument 'step' counts from 1, got ", step);

  const AdamHyper h = make_adam_hyper(step, lr, beta1, beta2, eps, weight_decay);
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(mask_words.const_data_ptr<int32_t>());
  // Before any write: afterwards the kernel can trust every set bit (a block with 1024 set bits
  // lies inside n) and every compact index (inside [0, active)).
  check_compact_state(mask, block_offsets.const_data_ptr<int64_t>(), n, active, op);
  const bool avx2 = cpu_has_avx2();
  CPL_DISPATCH_PARAM_TYPES(param.scalar_type(), op, [&] {
    const MaskedArgs<scalar_t> a{param.mutable_data_ptr<scalar_t>(),
                                 grad.const_data_ptr<scalar_t>(),
                                 mask,
                                 block_offsets.const_data_ptr<int64_t>(),
                                 exp_avg.mutable_data_ptr<float>(),
                                 exp_avg_sq.mutable_data_ptr<float>(),
                                 n,
                                 active,
                                 h};
    at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainElements / kOffsetBlock), [&](int64_t b0, int64_t b1) {
      avx2 ? masked_blocks_avx2(a, b0, b1) : masked_blocks_base(a, b0, b1);
    });
  });
}

}  // namespace cpu
}  // namespace cpl
