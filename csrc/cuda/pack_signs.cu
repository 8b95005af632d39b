// pack_signs_: 2-bit sign codes, 16 per int32 word. One element per lane: two warp ballots
// (positive, negative) give a warp's 32 elements as bit masks; spreading each 16-bit half to
// the even bits interleaves them into the two code words lanes 0 and 16 store.
#include "common.cuh"

namespace cpl_cuda {
namespace {

// Bit k of x (k < 16) moves to bit 2k.
__device__ __forceinline__ uint32_t spread_even(uint32_t x) {
  x &= 0xFFFFu;
  x = (x | (x << 8)) & 0x00FF00FFu;
  x = (x | (x << 4)) & 0x0F0F0F0Fu;
  x = (x | (x << 2)) & 0x33333333u;
  x = (x | (x << 1)) & 0x55555555u;
  return x;
}

template <typename T>
__global__ void pack_signs_kernel(PackSignsParams prm) {
  const T* src = static_cast<const T*>(prm.src);
  const int64_t n = prm.numel;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  // The loop bound is the warp's first element, so whole warps iterate together (ballots).
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
       w * kWarp < n; w += warps_total) {
    const int64_t i = w * kWarp + lane;
    const float x = i < n ? to_f32<T>(src[i]) : 0.f;
    // NaN is neither > 0 nor < 0: code 0, like zero.
    const uint32_t pos = __ballot_sync(kFullMask, x > 0.f);
    const uint32_t neg = __ballot_sync(kFullMask, x < 0.f);
    if (lane == 0 || lane == 16) {
      const int half = lane / 16;
      const int64_t word = w * 2 + half;
      if (word * 16 < n) {
        const uint32_t code = spread_even(pos >> (16 * half)) | (spread_even(neg >> (16 * half)) << 1);
        prm.codes[word] = static_cast<int32_t>(code);
      }
    }
  }
}

}  // namespace

cudaError_t launch_pack_signs(const PackSignsParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  const int64_t blocks = blocks_for(p.numel, kThreads);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    pack_signs_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
    CPL_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  });
}

}  // namespace cpl_cuda
