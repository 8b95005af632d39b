"""Tolerance table (DESIGN.md section 4).

Kernels do fp32 math like the reference but may fuse or reorder operations, so fp32 results
differ by a few ulps. Low-precision params are the fp32 result rounded once: at most one ulp of
the dtype apart (a double rounding at a tie), i.e. PyTorch's own rounding error, never more.
Tests use lr = 0.05 so that a wrong update (missing bias correction, eps, decay) moves a
param by far more than these tolerances, even in bf16.
"""
import torch

PARAM_TOL = {
    torch.float32: dict(rtol=2e-6, atol=1e-7),
    torch.bfloat16: dict(rtol=2 ** -7, atol=1e-7),  # one bf16 ulp (2**-8 relative), doubled
    torch.float16: dict(rtol=2 ** -10, atol=1e-7),  # one fp16 ulp (2**-11 relative), doubled
}
STATE_TOL = dict(rtol=2e-6, atol=1e-9)  # fp32 optimizer state
SUM_TOL = dict(rtol=1e-10, atol=1e-9)   # fp64 sums: only the summation order differs

SHAPES = [0, 1, 15, 16, 17, 31, 33, 1000, 2**20 + 7]
SMALL_SHAPES = [0, 1, 15, 16, 17, 31, 33, 1000, 4099]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def shapes_for(backend: str) -> list[int]:
    """The Triton interpreter is slow on CPU: small shapes only there."""
    return SMALL_SHAPES if backend == "triton" else SHAPES
