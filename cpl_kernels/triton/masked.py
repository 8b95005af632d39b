"""masked_adamw_step_: AdamW on active elements with compact m, v (layout in reference.py).

One program per 1024-element offset block: block_offsets gives the compact index of the block's
first active element, and an exclusive prefix sum of the mask bits inside the block gives the
rest, so no program depends on another.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import adam_direction, bias_corrections, fma32, store_param

OFFSET_BLOCK = 1024  # reference.OFFSET_BLOCK: elements per block_offsets entry


@triton.jit
def _masked_adamw_kernel(p_ptr, g_ptr, mask_ptr, offsets_ptr, m_ptr, v_ptr, n, lr, beta1,
                         one_minus_beta1, beta2, one_minus_beta2, bc1, bc2_sqrt, eps, weight_decay,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    elem = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = elem < n
    word = tl.load(mask_ptr + elem // 32, mask=valid, other=0)
    active = ((word >> (elem % 32).to(tl.int32)) & 1).to(tl.int64)
    active = tl.where(valid, active, 0)
    base = tl.load(offsets_ptr + pid)
    idx = base + tl.cumsum(active, axis=0) - active  # exclusive prefix count within the block
    on = active != 0
    p = tl.load(p_ptr + elem, mask=on, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + elem, mask=on, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + idx, mask=on, other=0.0)
    v = tl.load(v_ptr + idx, mask=on, other=0.0)
    m = fma32(g, one_minus_beta1, beta1 * m)
    v = fma32(one_minus_beta2 * g, g, beta2 * v)
    # The reference adds the decay term unconditionally (no wd == 0 special case): so do we.
    u = adam_direction(m, v, bc1, bc2_sqrt, eps) + weight_decay * p
    tl.store(m_ptr + idx, m, mask=on)
    tl.store(v_ptr + idx, v, mask=on)
    store_param(p_ptr + elem, p - lr * u, on)


def masked_adamw_step_(param, grad, mask_words, block_offsets, exp_avg, exp_avg_sq, step, lr,
                       beta1, beta2, eps, weight_decay):
    n = param.numel()
    blocks = block_offsets.numel()
    if blocks == 0 or exp_avg.numel() == 0:
        return None  # nothing active: nothing moves
    bc1, bc2_sqrt = bias_corrections(step, beta1, beta2)
    _masked_adamw_kernel[(blocks,)](param, grad, mask_words, block_offsets, exp_avg, exp_avg_sq, n,
                                    lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2, bc1, bc2_sqrt, eps,
                                    weight_decay, BLOCK=OFFSET_BLOCK)
    return None
