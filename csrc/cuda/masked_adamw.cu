// masked_adamw_step_: AdamW on active elements with compact m, v. One 1024-thread block per
// 1024-element offset block; warp k of the block owns exactly mask word k of the block, so an
// element's compact index is block_offsets[block] + (active elements in earlier warps, a scan
// over 32 popcounts) + popc(word & lanes below it). Each active element takes the step engine's
// rule (engine.cuh rule_element: unscale, non-finite skip and count) around the AdamW direction
// (directions.cuh), the CPL optimizers' own arithmetic; the non-finite count is one
// __syncthreads_count and one atomicAdd per block.
//
// Index safety (docs/design.md section 3): masked_validate_kernel checks the compact-state
// invariant and writes *prm.error; the step kernel reads that word first and writes nothing when
// it is set, and it also never dereferences a compact index outside [0, state_len) (a guard
// that costs one compare per active element). The torch glue (register.cpp) launches validate
// then step, and raises from one host read of the error word.
#include "engine.cuh"

namespace cpl_cuda {
namespace {

constexpr int kOffsetBlock = 1024;  // reference.OFFSET_BLOCK
constexpr int kWordsPerBlock = kOffsetBlock / kWarp;

// One warp per 1024-element block: lane k reads mask word k of the block (coalesced) and a warp
// sum gives the block's popcount; lane 0 checks entry b of block_offsets (in [0, state_len], 0
// for b == 0) and the link to entry b + 1 (or, for the last block, to state_len), and the lowest
// failing code wins by atomicMin. Reads 0.13 B per element (mask + offsets).
__global__ void masked_validate_kernel(MaskedAdamWParams prm) {
  const int64_t n = prm.numel;
  const int64_t words = (n + kWarp - 1) / kWarp;
  const int64_t blocks = (n + kOffsetBlock - 1) / kOffsetBlock;
  const int64_t state_len = prm.state_len;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarp; b < blocks;
       b += warps_total) {
    const int64_t w = b * kWordsPerBlock + lane;
    const uint32_t word = w < words ? static_cast<uint32_t>(__ldg(prm.mask_words + w)) : 0u;
    unsigned long long code = kMaskedStateOk;
    if (w == words - 1 && n % kWarp != 0 && (word >> (n % kWarp)) != 0u) code = 0;  // bits past n
    const unsigned long long count = warp_sum(static_cast<unsigned long long>(__popc(word)));  // lane 0
    if (lane == 0) {
      const int64_t x = __ldg(prm.block_offsets + b);
      if (x < 0 || x > state_len || (b == 0 && x != 0)) {
        code = static_cast<unsigned long long>(b) + 1;
      } else if (b + 1 < blocks) {  // x in [0, state_len]: x + count cannot overflow
        if (__ldg(prm.block_offsets + b + 1) != x + static_cast<int64_t>(count))
          code = static_cast<unsigned long long>(b) + 2;
      } else if (x + static_cast<int64_t>(count) != state_len) {
        code = static_cast<unsigned long long>(blocks) + 1;
      }
    }
    if (code != kMaskedStateOk) atomicMin(prm.error, code);
  }
}

template <typename T>
__global__ void __launch_bounds__(kOffsetBlock)
    masked_adamw_kernel(MaskedAdamWParams prm, AdamDirection<true> d, RuleConsts k) {
  // Written by masked_validate_kernel earlier on this stream; the same for every thread, as is
  // found_inf, so the whole grid returns before the barriers below.
  if (__ldg(prm.error) != kMaskedStateOk) return;
  if (prm.found_inf != nullptr && __ldg(prm.found_inf) != 0) return;  // GradScaler: nothing written
  if (k.has_scale) k.scale = __ldg(prm.grad_scale);
  __shared__ int warp_prefix[kOffsetBlock / kWarp];
  T* param = static_cast<T*>(prm.param);
  const T* grad = static_cast<const T*>(prm.grad);
  const int64_t n = prm.numel;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t block = blockIdx.x;
  const int64_t i = block * kOffsetBlock + threadIdx.x;
  const int64_t word_index = block * (kOffsetBlock / kWarp) + warp;
  const uint32_t word = word_index * kWarp < n ? static_cast<uint32_t>(__ldg(prm.mask_words + word_index)) : 0u;
  if (lane == 0) warp_prefix[warp] = __popc(word);
  __syncthreads();
  if (warp == 0) {  // exclusive scan of the 32 per-warp counts
    const int own = warp_prefix[lane];
    int incl = own;
#pragma unroll
    for (int o = 1; o < kWarp; o <<= 1) {
      const int up = __shfl_up_sync(kFullMask, incl, o);
      if (lane >= o) incl += up;
    }
    warp_prefix[lane] = incl - own;
  }
  __syncthreads();
  unsigned conflicting = 0, bad = 0;  // conflicting stays 0: no reference
  if (i < n && ((word >> lane) & 1u)) {
    const int64_t idx = __ldg(prm.block_offsets + block) + warp_prefix[warp] + __popc(word & ((1u << lane) - 1u));
    if (idx >= 0 && idx < prm.state_len) {  // always, after validation; never dereferenced otherwise
      float p = to_f32<T>(param[i]);
      float m = prm.exp_avg[idx], v = prm.exp_avg_sq[idx];
      rule_element(p, to_f32<T>(grad[i]), m, v, 0, d, k, conflicting, bad);
      if (!bad) {  // a non-finite gradient leaves p, m and v as they were
        prm.exp_avg[idx] = m;
        prm.exp_avg_sq[idx] = v;
        param[i] = from_f32<T>(p);
      }
    }
  }
  const int block_bad = __syncthreads_count(bad);
  if (threadIdx.x == 0 && block_bad) atomicAdd(prm.nonfinite, static_cast<unsigned long long>(block_bad));
}

}  // namespace

cudaError_t launch_masked_adamw_validate(const MaskedAdamWParams& p, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(p.error, 0xFF, sizeof(unsigned long long), stream);  // kMaskedStateOk
  if (err != cudaSuccess) return err;
  if (p.numel == 0) return cudaSuccess;  // no blocks: the glue checks state_len == 0 on the host
  const int64_t blocks = (p.numel + kOffsetBlock - 1) / kOffsetBlock;
  const int64_t grid = blocks_for(blocks, kThreads / kWarp);
  masked_validate_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p);
  CPL_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

cudaError_t launch_masked_adamw_step(const MaskedAdamWParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  // The scalars as the engine and the reference derive them (reference_step.scalars): the bias
  // corrections in double on the host, then rounded once.
  AdamDirection<true> d = AdamDirection<true>::make(p.hyper);
  d.bc1 = static_cast<float>(1.0 - std::pow(p.hyper[0], p.step));
  d.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(p.hyper[1], p.step)));
  RuleConsts k;
  k.lr = static_cast<float>(p.lr);
  k.has_scale = p.grad_scale != nullptr;
  k.scale = 1.f;  // read on the device
  k.skip_nonfinite = p.skip_nonfinite;
  k.update_criterion = true;  // no reference: every element collaborative
  k.strict = true;
  const int64_t blocks = (p.numel + kOffsetBlock - 1) / kOffsetBlock;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    masked_adamw_kernel<T><<<static_cast<unsigned>(blocks), kOffsetBlock, 0, stream>>>(p, d, k);
    CPL_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  });
}

}  // namespace cpl_cuda
