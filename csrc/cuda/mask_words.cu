// cpl_mask_words: the CPL mask of a against b (or b's 2-bit sign codes) written straight into
// its bits (contract: cpl_kernels/reference.py cpl_mask_words). One 1024-thread block per
// 1024-element offset block: each thread decides one element on signs (a product could underflow
// to -0 in fp32), each warp's __ballot_sync is one mask word, and __syncthreads_count is the
// block's popcount, written to block_counts (the torch glue scans them into block_offsets). No
// temporary beyond the 1-bit output and one int64 per 1024 elements.
#include "common.cuh"

namespace cpl_cuda {
namespace {

constexpr int kBlockElements = 1024;  // reference.OFFSET_BLOCK

template <typename T>
__global__ void __launch_bounds__(kBlockElements) mask_words_kernel(MaskWordsParams prm) {
  const int64_t n = prm.numel;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBlockElements + threadIdx.x;
  bool collaborative_bit = false;
  if (i < n) {
    const float x = to_f32<T>(static_cast<const T*>(prm.a)[i]);
    int r;
    if (prm.b_codes != nullptr) {
      r = decode_sign(static_cast<uint32_t>(__ldg(prm.b_codes + i / 16)), static_cast<int>(i % 16));
    } else {
      const float y = to_f32<T>(static_cast<const T*>(prm.b)[i]);
      r = y > 0.f ? 1 : (y < 0.f ? -1 : 0);  // NaN: 0, collaborative
    }
    collaborative_bit = collaborative(x, r);
  }
  const uint32_t word = __ballot_sync(kFullMask, collaborative_bit);  // bits past n are 0
  const int64_t w = i / 32;
  if (threadIdx.x % kWarp == 0 && w * 32 < n) prm.mask_out[w] = static_cast<int32_t>(word);
  const int count = __syncthreads_count(collaborative_bit);
  if (threadIdx.x == 0) prm.block_counts[blockIdx.x] = count;
}

}  // namespace

cudaError_t launch_mask_words(const MaskWordsParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  const int64_t blocks = (p.numel + kBlockElements - 1) / kBlockElements;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    mask_words_kernel<T><<<static_cast<unsigned>(blocks), kBlockElements, 0, stream>>>(p);
    CPL_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  });
}

}  // namespace cpl_cuda
