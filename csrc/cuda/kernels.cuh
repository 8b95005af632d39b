// Launch functions of the CUDA kernels. No torch headers: raw pointers, int64 element counts,
// one params struct per op, a cudaStream_t, and a cudaError_t back (the launch check of every
// kernel launched). The torch glue (register.cpp) validates tensors and fills the structs.
// Layouts are the contract of cpl_kernels/reference.py.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace cpl_cuda {

// Param/grad dtype; optimizer state is always fp32 and all math is fp32 (sums fp64).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum class Criterion : int { kUpdate = 0, kGradient = 1 };

struct PackSignsParams {
  const void* src;  // numel elements of dtype
  DType dtype;
  int32_t* codes;   // ceil(numel / 16) words
  int64_t numel;
};

struct StatsParams {
  const void* a;             // numel elements of dtype
  const void* b;             // numel elements of dtype, or null when b_codes is given
  const int32_t* b_codes;    // packed sign codes of b, or null
  DType dtype;
  int32_t* mask_out;         // ceil(numel / 32) words, or null
  int64_t numel;
  unsigned long long* counts;  // [n_pos, n_neg, n_zero], zeroed by the caller; kernels add
  double* sums;                // [pos_sum, neg_sum], zeroed by the caller; kernels add
};

// Scalars of one Adam/AdamW step, fp32 as the reference applies them.
struct AdamHyper {
  float lr, beta1, beta2, eps, weight_decay;
  float one_minus_beta1, one_minus_beta2;  // computed in double, then rounded (as torch's alpha)
  float bias_correction1, bias_correction2_sqrt;  // 1 - beta1^t, sqrt(1 - beta2^t) (host, double)
  bool decoupled;
  Criterion criterion;
  bool strict;
};

struct AdamParams {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  const int32_t* codes;  // null: no reference, every element collaborative
  DType dtype;
  int64_t numel;
  AdamHyper hyper;
  unsigned long long* conflicting;  // one counter, zeroed by the caller
};

struct SgdHyper {
  float lr, momentum, weight_decay;
  float one_minus_dampening;  // computed in double, then rounded (as torch's alpha)
  bool nesterov, init_buffer;
  Criterion criterion;
  bool strict;
};

struct SgdParams {
  void* param;
  const void* grad;
  float* momentum_buffer;  // null when momentum == 0
  const int32_t* codes;
  DType dtype;
  int64_t numel;
  SgdHyper hyper;
  unsigned long long* conflicting;
};

struct MaskedAdamWParams {
  void* param;
  const void* grad;
  const int32_t* mask_words;     // 1 bit per element
  const int64_t* block_offsets;  // active elements before each 1024-element block
  float* exp_avg;                // one entry per active element
  float* exp_avg_sq;
  DType dtype;
  int64_t numel;
  AdamHyper hyper;  // decoupled decay always applied; criterion/strict unused
};

// Many tensors of one dtype. The arrays are host arrays of length num_tensors; the launch
// function packs them into by-value kernel tables (no host-to-device copy, so the launches can
// be captured in a CUDA graph), as many launches as the tables need.
struct AdamMultiParams {
  int64_t num_tensors;
  void* const* params;
  const void* const* grads;
  float* const* exp_avgs;
  float* const* exp_avg_sqs;
  const int32_t* const* codes;  // entries may be null
  const int64_t* numels;
  const int64_t* count_slots;   // index into counts for each tensor
  DType dtype;
  const double* step;  // device scalar: the step count t (already incremented)
  const double* lr;    // device scalar
  double beta1, beta2, eps, weight_decay;
  bool decoupled;
  Criterion criterion;
  bool strict;
  unsigned long long* counts;  // device, zeroed by the caller
};

struct SgdMultiParams {
  int64_t num_tensors;
  void* const* params;
  const void* const* grads;
  float* const* momentum_buffers;  // all null when momentum == 0
  const int32_t* const* codes;
  const int64_t* numels;
  const int64_t* count_slots;
  DType dtype;
  const double* lr;  // device scalar
  float momentum, one_minus_dampening, weight_decay;
  bool nesterov, init_buffer;
  Criterion criterion;
  bool strict;
  unsigned long long* counts;
};

cudaError_t launch_pack_signs(const PackSignsParams& p, cudaStream_t stream);
cudaError_t launch_contribution_stats(const StatsParams& p, cudaStream_t stream);
cudaError_t launch_cpl_adam_step(const AdamParams& p, cudaStream_t stream);
cudaError_t launch_cpl_sgd_step(const SgdParams& p, cudaStream_t stream);
cudaError_t launch_masked_adamw_step(const MaskedAdamWParams& p, cudaStream_t stream);
cudaError_t launch_cpl_adam_step_multi(const AdamMultiParams& p, cudaStream_t stream);
cudaError_t launch_cpl_sgd_step_multi(const SgdMultiParams& p, cudaStream_t stream);

}  // namespace cpl_cuda
