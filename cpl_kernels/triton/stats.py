"""contribution_stats and contribution_stats_codes: counts and fp64 sums of a*b, optional mask.

Each program reduces a [BLOCK_WORDS, 32] tile to one row of partials (3 int64 counts, 2 fp64
sums); the host adds the rows with torch. That keeps counts exact and sums in fp64 without
atomics, and the order of the final sum is fixed (deterministic run to run).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import STATS_BLOCK_WORDS, decode_signs, dummy_int32, grid


@triton.jit
def _stats_kernel(a_ptr, b_ptr, mask_ptr, counts_ptr, sums_ptr, n, n_mask_words,
                  B_IS_CODES: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_WORDS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    words = pid * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS).to(tl.int64)
    lanes = tl.arange(0, 32)
    elem = words[:, None] * 32 + lanes[None, :]
    valid = elem < n
    # fp32 -> fp64 is exact and the product of two fp32 values is exact in fp64.
    a = tl.load(a_ptr + elem, mask=valid, other=0.0).to(tl.float32).to(tl.float64)
    if B_IS_CODES:
        cw = tl.load(b_ptr + elem // 16, mask=valid, other=0)
        b = decode_signs(cw, (elem % 16).to(tl.int32)).to(tl.float64)
    else:
        b = tl.load(b_ptr + elem, mask=valid, other=0.0).to(tl.float32).to(tl.float64)
    prod = a * b
    prod = tl.where(prod != prod, 0.0, prod)  # a NaN product counts as zero
    pos = valid & (prod > 0)
    neg = valid & (prod < 0)
    zero = valid & (prod == 0)
    row = pid * 3
    tl.store(counts_ptr + row, tl.sum(pos.to(tl.int64)))
    tl.store(counts_ptr + row + 1, tl.sum(neg.to(tl.int64)))
    tl.store(counts_ptr + row + 2, tl.sum(zero.to(tl.int64)))
    tl.store(sums_ptr + pid * 2, tl.sum(tl.where(pos, prod, 0.0)))
    tl.store(sums_ptr + pid * 2 + 1, tl.sum(tl.where(neg, prod, 0.0)))
    if HAS_MASK:
        # collaborative = a*b >= 0; bits past n stay 0 as the reference pads them.
        bit = (valid & (prod >= 0)).to(tl.int64) << lanes[None, :].to(tl.int64)
        tl.store(mask_ptr + words, tl.sum(bit, axis=1).to(tl.int32), mask=words < n_mask_words)


def _run(a, b, mask_out, b_is_codes: bool):
    n = a.numel()
    n_mask_words = (n + 31) // 32
    programs = grid(n_mask_words, STATS_BLOCK_WORDS)[0]
    if programs == 0:
        return (torch.zeros(3, dtype=torch.int64, device=a.device),
                torch.zeros(2, dtype=torch.float64, device=a.device))
    counts = torch.empty(programs, 3, dtype=torch.int64, device=a.device)
    sums = torch.empty(programs, 2, dtype=torch.float64, device=a.device)
    mask = mask_out if mask_out is not None else dummy_int32(a.device)
    _stats_kernel[(programs,)](a, b, mask, counts, sums, n, n_mask_words, B_IS_CODES=b_is_codes,
                               HAS_MASK=mask_out is not None, BLOCK_WORDS=STATS_BLOCK_WORDS)
    return counts.sum(0), sums.sum(0)


def contribution_stats(a, b, mask_out=None):
    return _run(a, b, mask_out, b_is_codes=False)


def contribution_stats_codes(a, codes, mask_out=None):
    return _run(a, codes, mask_out, b_is_codes=True)
