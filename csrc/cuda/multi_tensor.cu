// Multi-tensor fused CPL steps: one launch covers up to kMaxTensors tensors / kMaxChunkBlocks
// chunks of one dtype, as torch's fused optimizers do (multi_tensor_apply). The tensor table is
// a by-value kernel argument (under the 4 KiB parameter limit), not a host-to-device copy, and lr
// and step are read from device scalars, so a whole step can be captured in a CUDA graph.
// Bias corrections are computed per block in double from the device step, as the reference
// computes them in Python double; the element math is step_math.cuh, shared with cpl_step.cu.
#include <cmath>

#include "step_math.cuh"

namespace cpl_cuda {
namespace {

constexpr int kMaxTensors = 36;
constexpr int kMaxChunkBlocks = 320;
constexpr int64_t kChunk = 65536;  // elements per block; a multiple of 16 (code words) and 4
constexpr int kVec = 4;

struct Table {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  float* state1[kMaxTensors];  // exp_avg, or the momentum buffer
  float* state2[kMaxTensors];  // exp_avg_sq (Adam only)
  const int32_t* codes[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t slot[kMaxTensors];
  unsigned char vec_ok[kMaxTensors];
  unsigned char block_tensor[kMaxChunkBlocks];
  int32_t block_chunk[kMaxChunkBlocks];
};
static_assert(sizeof(Table) + 128 <= 4096, "kernel parameters must stay under 4 KiB");

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

// Fills tables tensor by tensor, chunk by chunk, and calls launch(table, num_blocks) whenever a
// table is full and once at the end. Empty tensors are skipped (their count stays 0).
template <typename Launch>
cudaError_t for_each_table(int64_t num_tensors, void* const* params, const void* const* grads,
                           float* const* state1, float* const* state2, const int32_t* const* codes,
                           const int64_t* numels, const int64_t* slots, int64_t elem_size, Launch&& launch) {
  Table tab{};
  int nt = 0, nb = 0;
  for (int64_t ti = 0; ti < num_tensors; ++ti) {
    const int64_t n = numels[ti];
    if (n == 0) continue;
    tab.param[nt] = params[ti];
    tab.grad[nt] = grads[ti];
    tab.state1[nt] = state1 ? state1[ti] : nullptr;
    tab.state2[nt] = state2 ? state2[ti] : nullptr;
    tab.codes[nt] = codes[ti];
    tab.numel[nt] = n;
    tab.slot[nt] = slots[ti];
    tab.vec_ok[nt] = aligned_to(params[ti], elem_size * kVec) && aligned_to(grads[ti], elem_size * kVec) &&
                     aligned_to(tab.state1[nt], 16) && aligned_to(tab.state2[nt], 16);
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      tab.block_tensor[nb] = static_cast<unsigned char>(nt);
      tab.block_chunk[nb] = static_cast<int32_t>(c);
      ++nb;
      const bool last_chunk = c == chunks - 1;
      const bool tensors_full = nt + 1 == kMaxTensors && last_chunk;
      if (nb == kMaxChunkBlocks || tensors_full) {
        cudaError_t err = launch(tab, nb);
        if (err != cudaSuccess) return err;
        nb = 0;
        if (last_chunk) {
          nt = -1;  // the next tensor starts a fresh table at slot 0
        } else {  // the current tensor continues in slot 0 of a fresh table
          tab.param[0] = tab.param[nt];
          tab.grad[0] = tab.grad[nt];
          tab.state1[0] = tab.state1[nt];
          tab.state2[0] = tab.state2[nt];
          tab.codes[0] = tab.codes[nt];
          tab.numel[0] = tab.numel[nt];
          tab.slot[0] = tab.slot[nt];
          tab.vec_ok[0] = tab.vec_ok[nt];
          nt = 0;
        }
      }
    }
    ++nt;
  }
  if (nb > 0) return launch(tab, nb);
  return cudaSuccess;
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
