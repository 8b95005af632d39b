// Single-tensor fused CPL steps (Adam/AdamW and SGD): one pass over p, g, state and codes.
// Each thread owns 4 consecutive elements (one vector access per array when aligned); the
// conflicting count is reduced per block and added once per block.
#include "step_math.cuh"

namespace cpl_cuda {
namespace {

constexpr int kVec = 4;

template <typename T, int VEC>
__global__ void adam_kernel(AdamParams prm, AdamElementConsts k) {
  T* param = static_cast<T*>(prm.param);
  const T* grad = static_cast<const T*>(prm.grad);
  const int64_t n = prm.numel;
  unsigned long long conflicting = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kVec;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; i < n; i += stride) {
    if (VEC == kVec && i + kVec <= n) {
      conflicting += adam_run<T, kVec>(param, grad, prm.exp_avg, prm.exp_avg_sq, prm.codes, i, k);
    } else {
      for (int64_t j = i; j < i + kVec && j < n; ++j)
        conflicting += adam_run<T, 1>(param, grad, prm.exp_avg, prm.exp_avg_sq, prm.codes, j, k);
    }
  }
  conflicting = block_sum(conflicting);
  if (threadIdx.x == 0 && conflicting) atomicAdd(prm.conflicting, conflicting);
}

template <typename T, int VEC>
__global__ void sgd_kernel(SgdParams prm, SgdElementConsts k) {
  T* param = static_cast<T*>(prm.param);
  const T* grad = static_cast<const T*>(prm.grad);
  const int64_t n = prm.numel;
  unsigned long long conflicting = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kVec;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; i < n; i += stride) {
    if (VEC == kVec && i + kVec <= n) {
      conflicting += sgd_run<T, kVec>(param, grad, prm.momentum_buffer, prm.codes, i, k);
    } else {
      for (int64_t j = i; j < i + kVec && j < n; ++j)
        conflicting += sgd_run<T, 1>(param, grad, prm.momentum_buffer, prm.codes, j, k);
    }
  }
  conflicting = block_sum(conflicting);
  if (threadIdx.x == 0 && conflicting) atomicAdd(prm.conflicting, conflicting);
}

}  // namespace

cudaError_t launch_cpl_adam_step(const AdamParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  const AdamElementConsts k = make_adam_consts(p.hyper);
  const int64_t blocks = blocks_for(p.numel, static_cast<int64_t>(kThreads) * kVec);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = aligned_to(p.param, sizeof(T) * kVec) && aligned_to(p.grad, sizeof(T) * kVec) &&
                     aligned_to(p.exp_avg, 16) && aligned_to(p.exp_avg_sq, 16);
    if (vec) {
      adam_kernel<T, kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, k);
    } else {
      adam_kernel<T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, k);
    }
    CPL_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  });
}

cudaError_t launch_cpl_sgd_step(const SgdParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  const SgdElementConsts k = make_sgd_consts(p.hyper);
  const int64_t blocks = blocks_for(p.numel, static_cast<int64_t>(kThreads) * kVec);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = aligned_to(p.param, sizeof(T) * kVec) && aligned_to(p.grad, sizeof(T) * kVec) &&
                     aligned_to(p.momentum_buffer, 16);
    if (vec) {
      sgd_kernel<T, kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, k);
    } else {
      sgd_kernel<T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, k);
    }
    CPL_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  });
}

}  // namespace cpl_cuda
