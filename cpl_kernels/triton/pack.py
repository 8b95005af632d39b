"""pack_signs_: 2-bit sign codes, 16 per int32 word (layout in cpl_kernels/reference.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import PACK_BLOCK_WORDS, grid


@triton.jit
def _pack_signs_kernel(src_ptr, codes_ptr, n, n_words, BLOCK_WORDS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    words = pid * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS).to(tl.int64)
    lanes = tl.arange(0, 16)
    elem = words[:, None] * 16 + lanes[None, :]
    x = tl.load(src_ptr + elem, mask=elem < n, other=0.0).to(tl.float32)
    # NaN compares false both ways, so it gets code 0 like zero (the reference's rule).
    code = tl.where(x > 0, 1, tl.where(x < 0, 2, 0)).to(tl.int64)
    # Fields are disjoint, so the sum is an OR; int64 keeps bit 31 from overflowing, and the
    # truncation to int32 reinterprets it as the sign bit exactly like the reference.
    word = tl.sum(code << (2 * lanes[None, :]).to(tl.int64), axis=1)
    tl.store(codes_ptr + words, word.to(tl.int32), mask=words < n_words)


def pack_signs_(src: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    n, n_words = src.numel(), codes.numel()
    if n_words:
        _pack_signs_kernel[grid(n_words, PACK_BLOCK_WORDS)](src, codes, n, n_words,
                                                           BLOCK_WORDS=PACK_BLOCK_WORDS)
    return codes
