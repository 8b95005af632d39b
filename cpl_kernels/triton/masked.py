"""masked_adamw_step_: AdamW on active elements with compact m, v (layout in reference.py).

One program per 1024-element offset block: block_offsets gives the compact index of the block's
first active element, and an exclusive prefix sum of the mask bits inside the block gives the
rest, so no program depends on another.

Index safety (docs/design.md section 3): the host checks the compact-state invariant before the
launch (cpl_kernels._checks.compact_state, shared with the reference: one host sync per step),
and the kernel still masks out any compact index outside [0, state_len). fp32 arithmetic as
reference.masked_adamw_step_ (launch options exact_fp).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import _checks
from .. import reference as ref
from ._common import adam_direction, adam_state, exact_fp, store_param

OFFSET_BLOCK = ref.OFFSET_BLOCK  # elements per block_offsets entry


@triton.jit
def _masked_adamw_kernel(p_ptr, g_ptr, mask_ptr, offsets_ptr, m_ptr, v_ptr, n, state_len, lr, beta1,
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
    # Validated on the host; the bounds are kept so that no index outside the state is ever formed
    # into an access, whatever the caller passed.
    on = (active != 0) & (idx >= 0) & (idx < state_len)
    p = tl.load(p_ptr + elem, mask=on, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + elem, mask=on, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + idx, mask=on, other=0.0)
    v = tl.load(v_ptr + idx, mask=on, other=0.0)
    m, v = adam_state(g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2)
    # The reference adds the decay term unconditionally (no wd == 0 special case): so do we.
    u = adam_direction(m, v, bc1, bc2_sqrt, eps) + weight_decay * p
    tl.store(m_ptr + idx, m, mask=on)
    tl.store(v_ptr + idx, v, mask=on)
    store_param(p_ptr + elem, p - lr * u, on)


def masked_adamw_step_(param, grad, mask_words, block_offsets, exp_avg, exp_avg_sq, step, lr,
                       beta1, beta2, eps, weight_decay):
    n = param.numel()
    _checks.compact_state("masked_adamw_step_", mask_words, block_offsets, n, exp_avg.numel())
    blocks = block_offsets.numel()
    if blocks == 0 or exp_avg.numel() == 0:
        return None  # nothing active: nothing moves
    h = ref.adam_hyper(step, lr, beta1, beta2, eps, weight_decay)  # fp32 values: passed exactly
    _masked_adamw_kernel[(blocks,)](param, grad, mask_words, block_offsets, exp_avg, exp_avg_sq, n,
                                    exp_avg.numel(), h.lr, h.beta1, h.one_minus_beta1, h.beta2,
                                    h.one_minus_beta2, h.bias_correction1, h.bias_correction2_sqrt,
                                    h.eps, h.weight_decay, BLOCK=OFFSET_BLOCK, **exact_fp(param.device))
    return None
