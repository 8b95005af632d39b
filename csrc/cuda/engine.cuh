// The CUDA step engine (cpl::cpl_step_): the CPL rule written once (`rule_element`), around a
// per-kind direction functor D (directions.cuh). The contract is cpl_kernels/reference_step.py;
// this file follows its _step_one step by step.
//
// Launches: multi-tensor, over the tensor tables of tensor_table.cuh (by-value, up to 36
// tensors / 320 chunks of 64K elements of one dtype per launch); no host-to-device copy and no
// host read of a device value, so a whole step is CUDA-graph capturable:
//   * lr and step are read from device doubles, once per block (thread 0, into shared memory,
//     with D::set_step deriving the step-dependent scalars there);
//   * grad_scale (fp32) and found_inf (int32 flag: found_inf != 0) are device pointers; a set
//     flag makes every block return before it reads or writes anything (counts stay 0).
// Each thread runs kVec consecutive elements with one 16-byte (fp32) / 8-byte (16-bit) access per
// array when every pointer of the tensor is aligned (Table::vec_ok), else one element at a time.
// Counts: per-thread, reduced per block, one atomicAdd per block and row into the int64 [2, n]
// output (row 0 conflicting, row 1 non-finite). Indexing is int64.
#pragma once

#include "directions.cuh"
#include "tensor_table.cuh"

namespace cpl_cuda {
namespace {

// Rule options, uniform over a launch.
struct RuleArgs {
  const double* step;        // device scalar
  const double* lr;          // device scalar
  const float* grad_scale;   // device scalar, or null
  const int32_t* found_inf;  // device flag (nonzero: skip the step), or null
  unsigned long long* counts;  // [2, count_stride], zeroed by the caller
  int64_t count_stride;
  bool skip_nonfinite, update_criterion, strict;
};

struct RuleConsts {
  float lr, scale;
  bool has_scale, skip_nonfinite, update_criterion, strict;
};

// NaN or +-inf: the exponent bits are all ones (a bit test: immune to any fast-math assumption).
__device__ __forceinline__ bool nonfinite(float x) {
  return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u;
}

// One element: reference_step._step_one's steps 1-7. p, s1, s2 are updated in registers (left
// as they were where the gradient is not finite); returns through the counters.
template <class D>
__device__ __forceinline__ void rule_element(float& p, float g, float& s1, float& s2, int r, const D& d,
                                             const RuleConsts& k, unsigned& conflicting, unsigned& bad_count) {
  if (k.has_scale) g = __fdiv_rn(g, k.scale);       // 1. GradScaler's unscale, fused
  bool bad = false;
  if (k.skip_nonfinite) {                           // 2. untouched, counted; g = 0 so no NaN spreads
    bad = nonfinite(g);
    if (bad) g = 0.f;
  }
  g = d.pre(g, p);                                  // 3. L2 decay
  bool ok = true;
  if (!k.update_criterion) {                        // 4. criterion "gradient": zero the conflicting g
    ok = collaborative(g, r);
    if (!ok) g = 0.f;
  }
  float n1 = s1, n2 = s2;
  const float u = d.direction(g, p, n1, n2);        // 5. direction and new state
  if (k.update_criterion) ok = collaborative(u, r); // 6. criterion "update"
  if (!bad) {
    s1 = n1;
    s2 = n2;
    // 7. applied where collaborative (strict=False with criterion "gradient": everywhere)
    if (ok || !(k.update_criterion || k.strict)) p = __fsub_rn(p, __fmul_rn(k.lr, u));
  }
  conflicting += (!ok && !bad) ? 1u : 0u;
  bad_count += bad ? 1u : 0u;
}

// kVec (or 1) consecutive elements from i: VEC divides 16, so they share one code word. VEC > 1
// only when the tensor's pointers are aligned for it (Table::vec_ok) and i + VEC <= numel.
template <typename T, int VEC, class D>
__device__ __forceinline__ void engine_run(T* param, const T* grad, float* s1_ptr, float* s2_ptr,
                                           const int32_t* codes, int64_t i, const D& d, const RuleConsts& k,
                                           unsigned& conflicting, unsigned& bad_count) {
  float p[VEC], g[VEC], a[VEC], b[VEC];
  load_f32<T, VEC>(param + i, p);
  load_f32<T, VEC>(grad + i, g);
  if (d.reads_state1()) {
    load_f32<float, VEC>(s1_ptr + i, a);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) a[e] = 0.f;
  }
  if (d.reads_state2()) {
    load_f32<float, VEC>(s2_ptr + i, b);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) b[e] = 0.f;
  }
  const uint32_t word = codes ? static_cast<uint32_t>(__ldg(codes + i / 16)) : 0u;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    rule_element(p[e], g[e], a[e], b[e], decode_sign(word, static_cast<int>((i + e) % 16)), d, k, conflicting,
                 bad_count);
  }
  if (d.writes_state1()) store_f32<float, VEC>(s1_ptr + i, a);
  if (d.writes_state2()) store_f32<float, VEC>(s2_ptr + i, b);
  store_f32<T, VEC>(param + i, p);
}

// Shared prologue of the engine kernels: thread 0 reads the device scalars; returns whether the
// step is skipped (found_inf).
template <class D>
__device__ __forceinline__ bool engine_prologue(const D& dir, const RuleArgs& args, D& sd, RuleConsts& sk) {
  __shared__ int skip;
  if (threadIdx.x == 0) {
    skip = args.found_inf != nullptr && *args.found_inf != 0;
    D d = dir;
    d.set_step(*args.step);
    sd = d;
    RuleConsts k;
    k.lr = static_cast<float>(*args.lr);  // rounded once, as reference_step.scalars
    k.has_scale = args.grad_scale != nullptr;
    k.scale = k.has_scale ? *args.grad_scale : 1.f;
    k.skip_nonfinite = args.skip_nonfinite;
    k.update_criterion = args.update_criterion;
    k.strict = args.strict;
    sk = k;
  }
  __syncthreads();
  return skip != 0;
}

template <typename T, class D>
__global__ void __launch_bounds__(kThreads) step_engine_kernel(Table tab, D dir, RuleArgs args) {
  __shared__ D sd;
  __shared__ RuleConsts sk;
  // found_inf: the whole block leaves before reading or writing anything
  if (engine_prologue(dir, args, sd, sk)) return;
  const D d = sd;
  const RuleConsts k = sk;
  const int t = tab.block_tensor[blockIdx.x];
  T* param = static_cast<T*>(tab.param[t]);
  const T* grad = static_cast<const T*>(tab.grad[t]);
  const int64_t start = static_cast<int64_t>(tab.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = start + kChunk < tab.numel[t] ? start + kChunk : tab.numel[t];
  const bool vec = tab.vec_ok[t] != 0;
  unsigned conflicting = 0, bad = 0;  // at most kChunk / kThreads = 256 elements per thread
  for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * kVec; i < end;
       i += static_cast<int64_t>(blockDim.x) * kVec) {
    if (vec && i + kVec <= end) {
      engine_run<T, kVec>(param, grad, tab.state1[t], tab.state2[t], tab.codes[t], i, d, k, conflicting, bad);
    } else {
      for (int64_t j = i; j < i + kVec && j < end; ++j)
        engine_run<T, 1>(param, grad, tab.state1[t], tab.state2[t], tab.codes[t], j, d, k, conflicting, bad);
    }
  }
  const unsigned long long total_conflicting = block_sum(static_cast<unsigned long long>(conflicting));
  const unsigned long long total_bad = block_sum(static_cast<unsigned long long>(bad));
  if (threadIdx.x == 0) {
    if (total_conflicting) atomicAdd(args.counts + tab.slot[t], total_conflicting);
    if (total_bad) atomicAdd(args.counts + args.count_stride + tab.slot[t], total_bad);
  }
}

// ---- the 8-bit blockwise state format (cpl::cpl_step_8bit_, cpl_kernels/quant8.py) ----------------
// One warp per block of kQBlock = 256 elements, 8 consecutive elements per lane: dequantize
// (qmap[code] * absmax, maps in shared memory), the same rule_element as above, then requantize
// the warp's block: absmax = max |x| (NaN if one is NaN; a warp max by shuffles) clipped at 1e-12,
// code = the number of thresholds <= x / absmax (an 8-step branchless binary search). One launch
// per tensor (the per-tensor pointers are kernel arguments): no host sync, graph-capturable.
constexpr int64_t kQBlock = 256;
constexpr int kQPerLane = static_cast<int>(kQBlock / kWarp);  // 8

struct Blockwise8Tensor {
  void* param;
  const void* grad;
  uint8_t* q1;      // slot codes, or null when the kind does not use the slot
  uint8_t* q2;
  float* absmax1;   // one per kQBlock elements
  float* absmax2;
  const int32_t* codes;  // sign codes, or null
  int64_t numel;
  int64_t slot;     // column in the counts output
};

// The warp's block of x back into codes and absmax (lanes hold kQPerLane elements each).
__device__ __forceinline__ void requantize_warp(const float (&x)[kQPerLane], const bool (&live)[kQPerLane],
                                                const float* thresholds, uint8_t* q, float* absmax, int64_t block,
                                                int64_t i0, int lane) {
  float amax = 0.f;
  int nan = 0;
#pragma unroll
  for (int e = 0; e < kQPerLane; ++e) {
    if (!live[e]) continue;
    const float a = fabsf(x[e]);
    nan |= a != a;
    amax = a > amax ? a : amax;
  }
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(kFullMask, amax, o);
    amax = other > amax ? other : amax;
    nan |= __shfl_xor_sync(kFullMask, nan, o);
  }
  const float scale = nan ? __int_as_float(0x7fc00000) : (amax > 1e-12f ? amax : 1e-12f);
  if (lane == 0) absmax[block] = scale;
#pragma unroll
  for (int e = 0; e < kQPerLane; ++e) {
    if (!live[e]) continue;
    const float y = __fdiv_rn(x[e], scale);
    int c = 0;
#pragma unroll
    for (int s = 128; s >= 1; s >>= 1) c += y >= thresholds[c + s - 1] ? s : 0;
    q[i0 + e] = static_cast<uint8_t>(c);
  }
}

template <typename T, class D>
__global__ void __launch_bounds__(kThreads) step_engine_8bit_kernel(Blockwise8Tensor t, D dir, RuleArgs args,
                                                                    const float* qmaps) {
  __shared__ D sd;
  __shared__ RuleConsts sk;
  __shared__ float maps[4 * 256];  // per slot: map values, thresholds (quant8.qmaps)
  for (int j = threadIdx.x; j < 4 * 256; j += blockDim.x) maps[j] = qmaps[j];
  if (engine_prologue(dir, args, sd, sk)) return;  // its __syncthreads also covers `maps`
  const D d = sd;
  const RuleConsts k = sk;
  T* param = static_cast<T*>(t.param);
  const T* grad = static_cast<const T*>(t.grad);
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const int64_t blocks = (t.numel + kQBlock - 1) / kQBlock;
  unsigned conflicting = 0, bad = 0;
  // Grid-stride over 256-element blocks; the loop bound is uniform over a warp.
  for (int64_t block = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
       block < blocks; block += warps) {
    const int64_t i0 = block * kQBlock + static_cast<int64_t>(lane) * kQPerLane;
    const float scale1 = t.q1 ? t.absmax1[block] : 0.f, scale2 = t.q2 ? t.absmax2[block] : 0.f;
    float s1[kQPerLane], s2[kQPerLane];
    bool live[kQPerLane];
    const uint32_t word = t.codes && i0 < t.numel ? static_cast<uint32_t>(__ldg(t.codes + i0 / 16)) : 0u;
#pragma unroll
    for (int e = 0; e < kQPerLane; ++e) {
      const int64_t i = i0 + e;
      live[e] = i < t.numel;
      s1[e] = s2[e] = 0.f;
      if (!live[e]) continue;
      if (d.reads_state1()) s1[e] = __fmul_rn(maps[t.q1[i]], scale1);
      if (d.reads_state2()) s2[e] = __fmul_rn(maps[512 + t.q2[i]], scale2);
      float p = to_f32<T>(param[i]);
      rule_element(p, to_f32<T>(grad[i]), s1[e], s2[e], decode_sign(word, static_cast<int>(i % 16)), d, k,
                   conflicting, bad);
      param[i] = from_f32<T>(p);
    }
    if (d.writes_state1()) requantize_warp(s1, live, maps + 256, t.q1, t.absmax1, block, i0, lane);
    if (d.writes_state2()) requantize_warp(s2, live, maps + 768, t.q2, t.absmax2, block, i0, lane);
  }
  const unsigned long long total_conflicting = block_sum(static_cast<unsigned long long>(conflicting));
  const unsigned long long total_bad = block_sum(static_cast<unsigned long long>(bad));
  if (threadIdx.x == 0) {
    if (total_conflicting) atomicAdd(args.counts + t.slot, total_conflicting);
    if (total_bad) atomicAdd(args.counts + args.count_stride + t.slot, total_bad);
  }
}

template <typename T, class D>
cudaError_t launch_engine_8bit(const StepParams& p, const D& dir, const RuleArgs& args, cudaStream_t stream) {
  for (int64_t ti = 0; ti < p.num_tensors; ++ti) {
    const int64_t n = p.numels[ti];
    if (n == 0) continue;
    Blockwise8Tensor t{p.params[ti], p.grads[ti], p.q1 ? p.q1[ti] : nullptr, p.q2 ? p.q2[ti] : nullptr,
                       p.absmax1 ? p.absmax1[ti] : nullptr, p.absmax2 ? p.absmax2[ti] : nullptr, p.codes[ti], n,
                       p.count_slots[ti]};
    const int64_t grid = blocks_for((n + kQBlock - 1) / kQBlock, kThreads / kWarp);
    step_engine_8bit_kernel<T, D><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(t, dir, args, p.qmaps);
    CPL_RETURN_IF_LAUNCH_FAILED();
  }
  return cudaSuccess;
}

// One dtype group of kind D: as many table launches as the group needs, each checked.
template <typename T, class D>
cudaError_t launch_engine(const StepParams& p, const D& dir, const RuleArgs& args, cudaStream_t stream) {
  static_assert(sizeof(Table) + sizeof(D) + sizeof(RuleArgs) <= 4096 - 64,
                "kernel parameters must stay under 4 KiB");
  return for_each_table(p.num_tensors, p.params, p.grads, p.state1, p.state2, p.codes, p.numels, p.count_slots,
                        sizeof(T), [&](const Table& tab, int blocks) {
                          step_engine_kernel<T, D><<<blocks, kThreads, 0, stream>>>(tab, dir, args);
                          CPL_RETURN_IF_LAUNCH_FAILED();
                          return cudaSuccess;
                        });
}

}  // namespace
}  // namespace cpl_cuda
