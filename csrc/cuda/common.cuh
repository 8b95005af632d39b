// Device helpers shared by the .cu files: dtype conversion, vector loads, sign decoding,
// block reductions, the launch check and the dtype dispatch.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.cuh"

// Every launch is followed by this: a bad configuration surfaces at the call, not later.
#define CPL_RETURN_IF_LAUNCH_FAILED()          \
  do {                                         \
    cudaError_t cpl_err_ = cudaGetLastError(); \
    if (cpl_err_ != cudaSuccess) return cpl_err_; \
  } while (0)

namespace cpl_cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Enough resident blocks to fill any current GPU; grid-stride loops cover the rest, so the
// grid never needs more than 32 bits however large the tensor.
constexpr int64_t kMaxBlocks = 1 << 16;

template <typename T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }

// Round to nearest even, as torch's .to(dtype).
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

// VEC consecutive elements in one aligned access (16 B for fp32 x 4, 8 B for 16-bit x 4).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_f32(const T* ptr, float (&out)[VEC]) {
  Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(ptr);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_f32<T>(pk.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f32(T* ptr, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = from_f32<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(ptr) = pk;
}

inline bool aligned_to(const void* ptr, int64_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// Sign of r for element `lane16` (0..15) of a code word: +1, -1, or 0 (zero, NaN, unused 3).
__device__ __forceinline__ int decode_sign(uint32_t word, int lane16) {
  const uint32_t c = (word >> (2 * lane16)) & 3u;
  return c == 1u ? 1 : (c == 2u ? -1 : 0);
}

// x * r >= 0 decided on signs: ties (x == 0, r == 0) and NaN are collaborative.
__device__ __forceinline__ bool collaborative(float x, int s) {
  return !((x > 0.f && s < 0) || (x < 0.f && s > 0));
}

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) x += __shfl_down_sync(kFullMask, x, o);
  return x;
}

__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) x += __shfl_down_sync(kFullMask, x, o);
  return x;
}

// Sum over the block, valid in thread 0. All threads must call it.
template <typename V>
__device__ __forceinline__ V block_sum(V x) {
  __shared__ V partial[kThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  x = warp_sum(x);
  __syncthreads();  // the buffer may still be read from a previous call
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  V total = V(0);
  if (warp == 0) {
    total = lane < static_cast<int>(blockDim.x / kWarp) ? partial[lane] : V(0);
    total = warp_sum(total);
  }
  return total;
}

inline int64_t blocks_for(int64_t work_items, int64_t per_block) {
  int64_t b = (work_items + per_block - 1) / per_block;
  if (b < 1) b = 1;
  return b < kMaxBlocks ? b : kMaxBlocks;
}

// Calls fn(T{}) with T the C++ type of `dtype`: one template instead of a copy per dtype.
template <typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
    case DType::kFloat16: return fn(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cpl_cuda
