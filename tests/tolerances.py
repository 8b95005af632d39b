"""Tolerance table (docs/design.md section 4).

The reference spells out its fp32 rounding (cpl_kernels/reference.py docstring: every operation
correctly rounded on its own, scalars rounded once as csrc/cpu/directions.h does, in the C++
kernels' order), and the kernels follow it operation by operation. One rule per backend:

* cpp (C++ CPU kernels, no FMA: csrc/cpu/simd.h): bitwise (torch.equal) for params, exp_avg,
  exp_avg_sq, momentum buffers and frozen counts, for every param dtype: a bf16/fp16 step is the
  same fp32 computation rounded once to the param dtype (round to nearest even) on both sides.
* triton on CPU (the interpreter: numpy fp32, one rounding per operation): bitwise as well.
* GPU backends (cuda, triton on a GPU): written to the same arithmetic (separate __fmul_rn /
  __fadd_rn, Triton launched with enable_fp_fusion=False), but not yet run on a GPU against the
  bitwise rule, so they keep the ulp tolerances below until a GPU run (benchmarks/gpu_check.sh)
  confirms it. For bf16/fp16 params they may differ from the reference run in that dtype by at
  most twice PyTorch's own error (tests/test_ops_steps.py: assert_close_to_reference).

Frozen counts and bits are exact on every backend. Tests use lr = 0.05 so that a wrong update
(missing bias correction, eps, decay) moves a param by far more than the tolerances, even in bf16.
"""
import torch

PARAM_TOL = {torch.float32: dict(rtol=2e-6, atol=1e-7)}
STATE_TOL = dict(rtol=2e-6, atol=2e-7)  # fp32 state O(0.1-1): a few ulps
SUM_TOL = dict(rtol=1e-10, atol=1e-9)   # fp64 sums: only the summation order differs

# 4096: a round size; 4099 and 2**20 + 7: odd sizes with a partial last code word and block.
SHAPES = [0, 1, 15, 16, 17, 31, 33, 1000, 4096, 2**20 + 7]
SMALL_SHAPES = [0, 1, 15, 16, 17, 31, 33, 1000, 4096, 4099]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

BITWISE_BACKENDS = {("cpu", "cpp"), ("cpu", "triton")}


def bitwise(device: str, backend: str) -> bool:
    """Whether `backend` serving tensors on `device` must equal the reference bit for bit."""
    return (device, backend) in BITWISE_BACKENDS


def shapes_for(backend: str) -> list[int]:
    """The Triton interpreter is slow on CPU: small shapes only there."""
    return SMALL_SHAPES if backend == "triton" else SHAPES


def assert_bitwise(actual, expected, msg):
    actual = actual.cpu()
    if not torch.equal(actual, expected):
        differ = actual.float() != expected.float()
        worst = (actual.float() - expected.float()).abs().max().item()
        raise AssertionError(f"{msg}: {int(differ.sum())} of {differ.numel()} elements differ from the "
                             f"reference (max |diff| {worst:.3g}); expected bitwise equality")


def assert_close_to_reference(actual, same_dtype_ref, fp32_ref, dtype, msg, tol=None, exact=False):
    """exact (tolerances.bitwise): equal bit for bit to the reference run in the same dtype.
    Otherwise within the fp32 tolerance table of that run; or, for bf16/fp16 (docs/design.md
    section 4), an error against the fp32 computation at most twice the error of that reference
    run (PyTorch's own rounding error, which a 1-ulp tie difference can compound)."""
    if exact:
        assert actual.dtype == same_dtype_ref.dtype, msg
        assert_bitwise(actual, same_dtype_ref, msg)
        return
    actual, same_dtype_ref, fp32_ref = (t.cpu().float() for t in (actual, same_dtype_ref, fp32_ref))
    tol = tol or PARAM_TOL[torch.float32]
    if dtype == torch.float32 or torch.allclose(actual, same_dtype_ref, **tol):
        torch.testing.assert_close(actual, same_dtype_ref, **tol, msg=msg)
        return
    own_error = (same_dtype_ref - fp32_ref).abs().max().item()
    kernel_error = (actual - fp32_ref).abs().max().item()
    assert kernel_error <= 2 * own_error, f"{msg}: error {kernel_error} vs torch's own {own_error}"

