// The one place every op's schema is declared. Backends only add implementations:
// csrc/cpu/register.cpp (CPU), csrc/cuda/register.cpp (CUDA), cpl_kernels/ops.py (fake/meta).
// Importing cpl_kernels._C loads this library and so registers everything.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty Python module: importing it only loads the shared library (extension-cpp style).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(cpl, m) {
  // The step engine: one fused CPL step of optimizer `kind` over lists of tensors. Contract:
  // cpl_kernels/reference_step.py; kinds and the order of `hyper`: cpl_kernels/kinds.py.
  // state1/state2: the kind's fp32 state slots (empty lists for slots it does not use). step and
  // lr are tensors (device scalars on CUDA: graph-capturable). grad_scale/found_inf: GradScaler's
  // fused protocol. Returns int64 [2, len(params)]: conflicting counts, non-finite counts.
  m.def(
      "cpl_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(c!)[] state2, "
      "Tensor?[] codes, str kind, Tensor step, Tensor lr, float[] hyper, str criterion, bool strict, "
      "bool skip_nonfinite, Tensor? grad_scale, Tensor? found_inf) -> Tensor");
  // The step engine with 8-bit blockwise state (docs/design.md section 8; cpl_kernels/quant8.py):
  // state1/state2 uint8 codes (one per element), absmax1/absmax2 fp32 (one per 256 elements),
  // qmaps fp32 [2 slots][map values, thresholds][256]. Otherwise as cpl_step_.
  m.def(
      "cpl_step_8bit_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(c!)[] absmax1, "
      "Tensor(d!)[] state2, Tensor(e!)[] absmax2, Tensor qmaps, Tensor?[] codes, str kind, Tensor step, "
      "Tensor lr, float[] hyper, str criterion, bool strict, bool skip_nonfinite, Tensor? grad_scale, "
      "Tensor? found_inf) -> Tensor");
  m.def("pack_signs_(Tensor src, Tensor(a!) codes) -> ()");
  m.def("contribution_stats(Tensor a, Tensor b, Tensor(a!)? mask_out) -> (Tensor, Tensor)");
  m.def("contribution_stats_codes(Tensor a, Tensor codes, Tensor(a!)? mask_out) -> (Tensor, Tensor)");
  // Compact-state AdamW on the active elements of mask_words (contract: reference.py
  // masked_adamw_step_): the engine's AdamW step per active element, with its non-finite skip and
  // GradScaler protocol. Returns int64 0-dim: active elements left untouched (non-finite gradient).
  m.def(
      "masked_adamw_step_(Tensor(a!) param, Tensor grad, Tensor mask_words, Tensor block_offsets, "
      "Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, float step, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool skip_nonfinite, Tensor? grad_scale, Tensor? found_inf) -> Tensor");
  // The CPL mask of a parameter as bits, from a and b or a and b's sign codes (exactly one of
  // them), without a temporary the size of the parameter; optionally its compact-state offsets.
  // Returns int64 0-dim: the set bits. Contract: reference.py cpl_mask_words.
  m.def(
      "cpl_mask_words(Tensor a, Tensor? b, Tensor? codes, Tensor(a!) mask_out, "
      "Tensor(b!)? block_offsets_out) -> Tensor");
}
