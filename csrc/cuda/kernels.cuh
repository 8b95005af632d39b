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

struct MaskedAdamWParams {
  void* param;
  const void* grad;
  const int32_t* mask_words;     // 1 bit per element
  const int64_t* block_offsets;  // active elements before each 1024-element block
  float* exp_avg;                // one entry per active element
  float* exp_avg_sq;
  int64_t state_len;             // entries of exp_avg and exp_avg_sq
  DType dtype;
  int64_t numel;
  // The engine's AdamW (directions.cuh AdamDirection<true>): beta1, beta2, eps, weight_decay,
  // then step (counts from 1) and lr, all host values (the op takes them as floats).
  double hyper[4];
  double step, lr;
  bool skip_nonfinite;           // NaN/inf gradient elements left untouched and counted
  const float* grad_scale;       // device scalar (gradients are divided by it), or null
  const int32_t* found_inf;      // device flag: nonzero skips the whole step, or null
  unsigned long long* nonfinite;  // device counter, zeroed by the caller
  // Device word written by launch_masked_adamw_validate and read first by the step kernel:
  // kMaskedStateOk, or the code of the first violation of the compact-state invariant.
  unsigned long long* error;
};

// Codes of *MaskedAdamWParams::error, lowest = reported first (the CPU check's order): 0 = mask
// bits past numel; b + 1 = entry b of block_offsets wrong; blocks + 1 = the last offset plus its
// block's popcount != state_len.
constexpr unsigned long long kMaskedStateOk = ~0ull;

cudaError_t launch_pack_signs(const PackSignsParams& p, cudaStream_t stream);
cudaError_t launch_contribution_stats(const StatsParams& p, cudaStream_t stream);
// Sets *p.error (no host sync): launch it before launch_masked_adamw_step on the same stream.
cudaError_t launch_masked_adamw_validate(const MaskedAdamWParams& p, cudaStream_t stream);
cudaError_t launch_masked_adamw_step(const MaskedAdamWParams& p, cudaStream_t stream);

// cpl_mask_words (mask_words.cu): the CPL mask of a against b (or b's sign codes) as bits.
struct MaskWordsParams {
  const void* a;             // numel elements of dtype
  const void* b;             // numel elements of dtype, or null when b_codes is given
  const int32_t* b_codes;    // packed sign codes of b, or null
  DType dtype;
  int32_t* mask_out;         // ceil(numel / 32) words
  int64_t* block_counts;     // ceil(numel / 1024): the set bits of each 1024-element block
  int64_t numel;
};
cudaError_t launch_mask_words(const MaskWordsParams& p, cudaStream_t stream);

// ---- the step engine (cpl::cpl_step_; engine.cuh, directions.cuh, step_engine.cu) ----------

// One dtype group of one cpl_step_ call. Arrays are host arrays of length num_tensors (packed
// into by-value tensor tables, tensor_table.cuh); every scalar the kernels need at
// run time is a device pointer, so the launches are CUDA-graph capturable.
struct StepParams {
  const char* kind;      // a name of cpl_kernels/kinds.py (step_kind_num_hyper(kind) >= 0)
  const double* hyper;   // host, step_kind_num_hyper(kind) values in kinds.KINDS[kind].hyper order
  int64_t num_tensors;
  void* const* params;
  const void* const* grads;
  float* const* state1;  // null when the kind uses no slot 1 (step_kind_state_slots < 1)
  float* const* state2;  // null when it uses no slot 2
  const int32_t* const* codes;  // entries may be null (no reference for that param)
  const int64_t* numels;
  const int64_t* count_slots;   // column of each tensor in the counts output
  DType dtype;
  const double* step;        // device scalar, counts from 1
  const double* lr;          // device scalar
  const float* grad_scale;   // device scalar (gradients are divided by it), or null
  const int32_t* found_inf;  // device flag: nonzero skips the whole step, or null
  Criterion criterion;
  bool strict, skip_nonfinite;
  unsigned long long* counts;  // device int64 [2, count_stride], zeroed by the caller:
  int64_t count_stride;        // row 0 conflicting, row 1 non-finite gradient elements
  // The 8-bit blockwise state format (cpl_step_8bit_; cpl_kernels/quant8.py): a non-null qmaps
  // (device fp32 [2 slots][map values, thresholds][256]) selects it; state1/state2 are then null
  // and q1/q2 hold the uint8 codes, absmax1/absmax2 one fp32 per 256 elements.
  uint8_t* const* q1 = nullptr;
  uint8_t* const* q2 = nullptr;
  float* const* absmax1 = nullptr;
  float* const* absmax2 = nullptr;
  const float* qmaps = nullptr;
};

// The engine's kinds (directions.cuh), for the torch glue: the hyper count of `kind`, or -1 when
// the CUDA engine does not know it; its state slots for these hyper values; all names, for
// messages ("adam, adamw, sgd, lion").
int step_kind_num_hyper(const char* kind);
int step_kind_state_slots(const char* kind, const double* hyper);
const char* step_kind_names();
cudaError_t launch_cpl_step(const StepParams& p, cudaStream_t stream);

}  // namespace cpl_cuda
