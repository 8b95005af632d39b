// Multi-tensor fused CPL steps over tensor tables (tensor_table.cuh: up to kMaxTensors tensors /
// kMaxChunkBlocks chunks of one dtype per launch, by value); lr and step are read from device
// scalars, so a whole step can be captured in a CUDA graph.
// Bias corrections are computed per block in double from the device step, as the reference
// computes them in Python double; the element math is step_math.cuh, shared with cpl_step.cu.
#include <cmath>

#include "step_math.cuh"
#include "tensor_table.cuh"

namespace cpl_cuda {
namespace {

struct AdamMultiScalars {
  double beta1, beta2;
  float beta1_f, beta2_f, one_minus_beta1, one_minus_beta2, eps, wd;
  bool l2_decay, decoupled_decay, update_criterion, strict;
  const double* step;
  const double* lr;
};

template <typename T>
__global__ void adam_multi_kernel(Table tab, AdamMultiScalars s, unsigned long long* counts) {
  __shared__ AdamElementConsts k;
  const int t = tab.block_tensor[blockIdx.x];
  if (threadIdx.x == 0) {
    const double step = *s.step;
    k.lr = static_cast<float>(*s.lr);
    k.beta1 = s.beta1_f;
    k.beta2 = s.beta2_f;
    k.one_minus_beta1 = s.one_minus_beta1;
    k.one_minus_beta2 = s.one_minus_beta2;
    k.bc1 = static_cast<float>(1.0 - pow(s.beta1, step));
    k.bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(s.beta2, step)));
    k.eps = s.eps;
    k.wd = s.wd;
    k.l2_decay = s.l2_decay;
    k.decoupled_decay = s.decoupled_decay;
    k.update_criterion = s.update_criterion;
    k.strict = s.strict;
  }
  __syncthreads();
  T* param = static_cast<T*>(tab.param[t]);
  const T* grad = static_cast<const T*>(tab.grad[t]);
  const int64_t start = static_cast<int64_t>(tab.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = start + kChunk < tab.numel[t] ? start + kChunk : tab.numel[t];
  const bool vec = tab.vec_ok[t] != 0;
  const AdamElementConsts kc = k;
  unsigned long long conflicting = 0;
  for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * kVec; i < end; i += static_cast<int64_t>(blockDim.x) * kVec) {
    if (vec && i + kVec <= end) {
      conflicting += adam_run<T, kVec>(param, grad, tab.state1[t], tab.state2[t], tab.codes[t], i, kc);
    } else {
      for (int64_t j = i; j < i + kVec && j < end; ++j)
        conflicting += adam_run<T, 1>(param, grad, tab.state1[t], tab.state2[t], tab.codes[t], j, kc);
    }
  }
  conflicting = block_sum(conflicting);
  if (threadIdx.x == 0 && conflicting) atomicAdd(counts + tab.slot[t], conflicting);
}

template <typename T>
__global__ void sgd_multi_kernel(Table tab, SgdElementConsts base, const double* lr, unsigned long long* counts) {
  const int t = tab.block_tensor[blockIdx.x];
  SgdElementConsts k = base;
  k.lr = static_cast<float>(__ldg(lr));
  T* param = static_cast<T*>(tab.param[t]);
  const T* grad = static_cast<const T*>(tab.grad[t]);
  const int64_t start = static_cast<int64_t>(tab.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = start + kChunk < tab.numel[t] ? start + kChunk : tab.numel[t];
  const bool vec = tab.vec_ok[t] != 0;
  unsigned long long conflicting = 0;
  for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * kVec; i < end; i += static_cast<int64_t>(blockDim.x) * kVec) {
    if (vec && i + kVec <= end) {
      conflicting += sgd_run<T, kVec>(param, grad, tab.state1[t], tab.codes[t], i, k);
    } else {
      for (int64_t j = i; j < i + kVec && j < end; ++j)
        conflicting += sgd_run<T, 1>(param, grad, tab.state1[t], tab.codes[t], j, k);
    }
  }
  conflicting = block_sum(conflicting);
  if (threadIdx.x == 0 && conflicting) atomicAdd(counts + tab.slot[t], conflicting);
}

}  // namespace

cudaError_t launch_cpl_adam_step_multi(const AdamMultiParams& p, cudaStream_t stream) {
  AdamMultiScalars s;
  s.beta1 = p.beta1;
  s.beta2 = p.beta2;
  s.beta1_f = static_cast<float>(p.beta1);
  s.beta2_f = static_cast<float>(p.beta2);
  s.one_minus_beta1 = static_cast<float>(1.0 - p.beta1);
  s.one_minus_beta2 = static_cast<float>(1.0 - p.beta2);
  s.eps = static_cast<float>(p.eps);
  s.wd = static_cast<float>(p.weight_decay);
  s.l2_decay = !p.decoupled && p.weight_decay != 0.0;
  s.decoupled_decay = p.decoupled && p.weight_decay != 0.0;
  s.update_criterion = p.criterion == Criterion::kUpdate;
  s.strict = p.strict;
  s.step = p.step;
  s.lr = p.lr;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return for_each_table(p.num_tensors, p.params, p.grads, p.exp_avgs, p.exp_avg_sqs, p.codes, p.numels,
                          p.count_slots, sizeof(T), [&](const Table& tab, int blocks) {
                            adam_multi_kernel<T><<<blocks, kThreads, 0, stream>>>(tab, s, p.counts);
                            CPL_RETURN_IF_LAUNCH_FAILED();
                            return cudaSuccess;
                          });
  });
}

cudaError_t launch_cpl_sgd_step_multi(const SgdMultiParams& p, cudaStream_t stream) {
  SgdHyper h;
  h.lr = 0.f;  // read from the device scalar in the kernel
  h.momentum = p.momentum;
  h.one_minus_dampening = p.one_minus_dampening;
  h.weight_decay = p.weight_decay;
  h.nesterov = p.nesterov;
  h.init_buffer = p.init_buffer;
  h.criterion = p.criterion;
  h.strict = p.strict;
  const SgdElementConsts k = make_sgd_consts(h);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return for_each_table(p.num_tensors, p.params, p.grads, k.has_momentum ? p.momentum_buffers : nullptr,
                          nullptr, p.codes, p.numels, p.count_slots, sizeof(T),
                          [&](const Table& tab, int blocks) {
                            sgd_multi_kernel<T><<<blocks, kThreads, 0, stream>>>(tab, k, p.lr, p.counts);
                            CPL_RETURN_IF_LAUNCH_FAILED();
                            return cudaSuccess;
                          });
  });
}

}  // namespace cpl_cuda
