// Validation of MaskedAdamW's compact state (compact_state.h) before any write.
#include <ATen/Parallel.h>

#include <algorithm>

#include "compact_state.h"

namespace cpl {
namespace cpu {

namespace {

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

}  // namespace cpu
}  // namespace cpl
