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


# Under the interpreter (CPU tests) the fp32 -> bf16 store rounds differently from the GPU and
# from torch; store_param below emulates the right rounding there and uses the hardware op on a GPU.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


def exact_fp(device: torch.device) -> dict:
    """Launch options of every step kernel, for the reference's rounding (reference.py docstring):
    no contraction of a*b + c into an FMA (Triton fuses by default: LLVM contraction and ptxas
    --fmad=true), and on NVIDIA no flushing of subnormals in the libdevice sqrt_rn/div_rn
    (Triton sets __CUDA_FTZ by default; tiny Adam state such as v ~ 1e-40 is subnormal). The
    interpreter accepts and ignores both (numpy rounds every operation and keeps subnormals);
    enable_reflect_ftz exists only in the NVIDIA backend, which rejects unknown options."""
    options = dict(enable_fp_fusion=False)
    if device.type == "cuda" and torch.version.hip is None:
        options["enable_reflect_ftz"] = False
    return options


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
