"""Shared Triton pieces: tile geometry, sign decoding, the collaborative test, host helpers.

Every kernel works on tiles of whole packed words (a [BLOCK_WORDS, 16] tile for 2-bit codes, a
[BLOCK_WORDS, 32] tile for 1-bit masks), so each program owns its output words outright and
builds them with shifts and a row sum: no atomics on bits, and bits are exact by construction.
Offsets are int64 (program_id is widened first) so tensors over 2**31 elements index correctly.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

CODES_PER_WORD = 16
BITS_PER_WORD = 32
# 128 code words = 2048 elements per program: enough bytes in flight per SM for a memory-bound
# step on a GPU; the interpreter (tests) only sees a handful of programs at the small shapes.
STEP_BLOCK_WORDS = 128
STATS_BLOCK_WORDS = 32  # x 32 elements = 1024 per program
PACK_BLOCK_WORDS = 128


# Under the interpreter (CPU tests) a few numpy-backed ops round differently from the GPU and from
# torch; the helpers below emulate the right rounding there and use the hardware op on a GPU.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def fma32(a, b, c):
    """a * b + c rounded once, as torch's CPU kernels compute `c.add_(a, alpha=b)` (vec::fmadd).
    Matching it matters for optimizer state near zero, where a second rounding is a relative
    error far above the state tolerance."""
    if _INTERPRET:
        b64 = tl.cast(b, tl.float32).to(tl.float64)  # scalar args arrive as Python floats
        return (a.to(tl.float64) * b64 + c.to(tl.float64)).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def adam_direction(m, v, bc1, bc2_sqrt, eps):
    """mhat / (sqrt(vhat) + eps) in the reference's operation order, correctly rounded (the GPU
    defaults for sqrt and / are approximate)."""
    return tl.math.div_rn(tl.math.div_rn(m, bc1), tl.math.div_rn(tl.math.sqrt_rn(v), bc2_sqrt) + eps)


@triton.jit
def _bf16_rtne(x):
    """fp32 -> bf16 rounded to nearest even in integer arithmetic. Only for the interpreter,
    whose own fp32 -> bf16 cast truncates (a full ulp off torch's .to(torch.bfloat16))."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN (rounding could carry to inf)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_param(ptr, x, mask):
    """Stores fp32 `x` in the param dtype, rounded to nearest even like torch's .to(dtype)."""
    if ptr.dtype.element_ty == tl.float32:
        tl.store(ptr, x, mask=mask)
    elif _INTERPRET and ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr, _bf16_rtne(x), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def decode_signs(words, lanes):
    """fp32 sign (+1, -1, 0) of each element from its code word; code 3 (unused) reads as 0."""
    c = (words >> (2 * lanes)) & 3
    return tl.where(c == 1, 1.0, tl.where(c == 2, -1.0, 0.0))


@triton.jit
def collaborative(x, s):
    """x * r >= 0 decided on signs only: ties (x == 0, r == 0) and NaN count as collaborative."""
    conflicting = ((x > 0) & (s < 0)) | ((x < 0) & (s > 0))
    return conflicting == 0


def grid(n: int, per_program: int) -> tuple[int]:
    return (triton.cdiv(n, per_program),)


def dummy_int32(device: torch.device) -> torch.Tensor:
    """Stands in for an absent optional tensor (the kernel never dereferences it)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def bias_corrections(step: float, beta1: float, beta2: float) -> tuple[float, float]:
    """Computed in double on the host exactly as the reference does, then passed as fp32."""
    return 1.0 - beta1 ** step, (1.0 - beta2 ** step) ** 0.5
