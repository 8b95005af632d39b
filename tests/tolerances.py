"""Tolerance table (DESIGN.md section 4).

Kernels do fp32 math like the reference but may fuse or reorder operations, so fp32 results
differ by a few ulps: PARAM_TOL / STATE_TOL. For bf16/fp16 params the tests measure PyTorch's own
error (the reference run in that dtype against the fp32 computation) and allow the kernel at most
twice that (tests/test_ops_steps.py: assert_close_to_reference). Tests use lr = 0.05 so that a
wrong update (missing bias correction, eps, decay) moves a param by far more than these bounds,
even in bf16.
"""
import torch

PARAM_TOL = {torch.float32: dict(rtol=2e-6, atol=1e-7)}
STATE_TOL = dict(rtol=2e-6, atol=2e-7)  # fp32 state O(0.1-1): a fused multiply-add may differ by ~1 ulp of the terms
SUM_TOL = dict(rtol=1e-10, atol=1e-9)   # fp64 sums: only the summation order differs

SHAPES = [0, 1, 15, 16, 17, 31, 33, 1000, 2**20 + 7]
SMALL_SHAPES = [0, 1, 15, 16, 17, 31, 33, 1000, 4099]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def shapes_for(backend: str) -> list[int]:
    """The Triton interpreter is slow on CPU: small shapes only there."""
    return SMALL_SHAPES if backend == "triton" else SHAPES
