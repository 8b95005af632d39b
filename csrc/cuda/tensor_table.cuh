// Tensor tables of the step engine's launches (step_engine.cu): one launch covers up to kMaxTensors tensors / kMaxChunkBlocks chunks
// of one dtype, as torch's fused optimizers do (multi_tensor_apply). The table is a by-value
// kernel argument (under the 4 KiB parameter limit), not a host-to-device copy, so the launches
// can be captured in a CUDA graph. Block b works on chunk block_chunk[b] (kChunk elements) of
// tensor block_tensor[b].
#pragma once

#include "common.cuh"

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
}  // namespace cpl_cuda
