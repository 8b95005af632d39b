// contribution_stats(_codes): counts of positive/negative/zero products a*b, their fp64 sums,
// and optionally the collaborative mask (a*b >= 0, one bit per element via a warp ballot).
// Products are formed in fp64 (exact for fp32/bf16/fp16 inputs); per-block partials are added
// with one atomic per block and counter.
#include "common.cuh"

namespace cpl_cuda {
namespace {

template <typename T>
__global__ void stats_kernel(StatsParams prm) {
  const T* a = static_cast<const T*>(prm.a);
  const T* b = static_cast<const T*>(prm.b);
  const int64_t n = prm.numel;
  const int lane = threadIdx.x % kWarp;
  unsigned long long n_pos = 0, n_neg = 0, n_zero = 0;
  double pos_sum = 0.0, neg_sum = 0.0;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
       w * kWarp < n; w += warps_total) {
    const int64_t i = w * kWarp + lane;
    const bool valid = i < n;
    double prod = 0.0;
    if (valid) {
      const double x = static_cast<double>(to_f32<T>(a[i]));
      double y;
      if (prm.b_codes != nullptr) {
        y = static_cast<double>(decode_sign(static_cast<uint32_t>(__ldg(prm.b_codes + i / 16)),
                                            static_cast<int>(i % 16)));
      } else {
        y = static_cast<double>(to_f32<T>(b[i]));
      }
      prod = x * y;
      if (prod != prod) prod = 0.0;  // a NaN product counts as zero
    }
    if (valid) {
      if (prod > 0.0) { ++n_pos; pos_sum += prod; }
      else if (prod < 0.0) { ++n_neg; neg_sum += prod; }
      else { ++n_zero; }
    }
    if (prm.mask_out != nullptr) {
      // Bits past n stay 0, as the reference pads them.
      const uint32_t bits = __ballot_sync(kFullMask, valid && prod >= 0.0);
      if (lane == 0) prm.mask_out[w] = static_cast<int32_t>(bits);
    }
  }
  n_pos = block_sum(n_pos);
  n_neg = block_sum(n_neg);
  n_zero = block_sum(n_zero);
  pos_sum = block_sum(pos_sum);
  neg_sum = block_sum(neg_sum);
  if (threadIdx.x == 0) {
    if (n_pos) atomicAdd(prm.counts + 0, n_pos);
    if (n_neg) atomicAdd(prm.counts + 1, n_neg);
    if (n_zero) atomicAdd(prm.counts + 2, n_zero);
    atomicAdd(prm.sums + 0, pos_sum);
    atomicAdd(prm.sums + 1, neg_sum);
  }
}

}  // namespace

cudaError_t launch_contribution_stats(const StatsParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  const int64_t blocks = blocks_for(p.numel, kThreads);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    stats_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
    CPL_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  });
}

}  // namespace cpl_cuda
