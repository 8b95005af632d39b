// The compact-state layout of MaskedAdamW (docs/design.md section 1) on CPU: the per-block
// popcount both the step and its validation count with, and the validation itself
// (compact_state.cpp), which the CUDA ops also run on host copies before a launch.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "simd.h"

namespace cpl {
namespace cpu {

constexpr int64_t kWordsPerBlock = kOffsetBlock / kBitsPerWord;  // mask words per block_offsets entry

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
  const int64_t w0 = b * kWordsPerBlock, w1 = std::min(words, w0 + kWordsPerBlock);
  uint32_t count = 0;
#pragma omp simd reduction(+ : count)
  for (int64_t w = w0; w < w1; ++w) count += popcount32(mask[w]);
  return count;
}

// Every compact index a step will form lies in [0, active), or a ValueError naming the first
// violation (compact_state.cpp).
void check_compact_state(const uint32_t* mask, const int64_t* off, int64_t n, int64_t active, const char* op);
void check_compact_state(const at::Tensor& mask_words, const at::Tensor& block_offsets, int64_t numel,
                         int64_t state_len, const char* op);

}  // namespace cpu
}  // namespace cpl
