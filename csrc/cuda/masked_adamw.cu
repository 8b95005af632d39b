// masked_adamw_step_: AdamW on active elements with compact m, v. One 1024-thread block per
// 1024-element offset block; warp k of the block owns exactly mask word k of the block, so an
// element's compact index is block_offsets[block] + (active elements in earlier warps, a scan
// over 32 popcounts) + popc(word & lanes below it).
#include "step_math.cuh"

namespace cpl_cuda {
namespace {

constexpr int kOffsetBlock = 1024;  // reference.OFFSET_BLOCK

template <typename T>
__global__ void __launch_bounds__(kOffsetBlock) masked_adamw_kernel(MaskedAdamWParams prm, AdamElementConsts k) {
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
  const bool active = i < n && ((word >> lane) & 1u);
  if (!active) return;
  const int64_t idx = __ldg(prm.block_offsets + block) + warp_prefix[warp] + __popc(word & ((1u << lane) - 1u));
  float p = to_f32<T>(param[i]);
  const float g = to_f32<T>(grad[i]);
  float m = prm.exp_avg[idx], v = prm.exp_avg_sq[idx];
  // The reference always adds wd * p here (even wd == 0), and never freezes an active element.
  m = __fmaf_rn(g, k.one_minus_beta1, __fmul_rn(k.beta1, m));
  v = __fmaf_rn(__fmul_rn(k.one_minus_beta2, g), g, __fmul_rn(k.beta2, v));
  float u = __fdiv_rn(__fdiv_rn(m, k.bc1), __fadd_rn(__fdiv_rn(__fsqrt_rn(v), k.bc2_sqrt), k.eps));
  u = __fadd_rn(u, __fmul_rn(k.wd, p));
  p = __fsub_rn(p, __fmul_rn(k.lr, u));
  prm.exp_avg[idx] = m;
  prm.exp_avg_sq[idx] = v;
  param[i] = from_f32<T>(p);
}

}  // namespace

cudaError_t launch_masked_adamw_step(const MaskedAdamWParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  const AdamElementConsts k = make_adam_consts(p.hyper);
  const int64_t blocks = (p.numel + kOffsetBlock - 1) / kOffsetBlock;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    masked_adamw_kernel<T><<<static_cast<unsigned>(blocks), kOffsetBlock, 0, stream>>>(p, k);
    CPL_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  });
}

}  // namespace cpl_cuda
