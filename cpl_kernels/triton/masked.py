"""masked_adamw_step_: AdamW on active elements with compact m, v (layout in reference.py), and
cpl_mask_words: a parameter's CPL mask written as bits.

masked_adamw_step_: one program per 1024-element offset block: block_offsets gives the compact
index of the block's first active element, and an exclusive prefix sum of the mask bits inside
the block (tl.cumsum, a block-wide scan) gives the rest, so no program depends on another. Each
active element takes the engine's AdamW step (directions.direction, kind "adamw"; the skip of
non-finite gradients and GradScaler's unscale as step.py's rule), so the arithmetic is the CPL
optimizers' own. Non-finite counts: one partial per program, summed on the device.

Index safety (docs/design.md section 3): the host checks the compact-state invariant before the
launch (cpl_kernels._checks.compact_state, shared with the reference: one host sync per step),
and the kernel still masks out any compact index outside [0, state_len). fp32 arithmetic as
reference.masked_adamw_step_ (launch options exact_fp).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _checks
from .. import kinds
from .. import reference as ref
from .. import reference_step
from ._common import decode_signs, exact_fp, store_param
from .directions import direction, scalar_args

OFFSET_BLOCK = ref.OFFSET_BLOCK  # elements per block_offsets entry


@triton.jit
def _masked_adamw_kernel(p_ptr, g_ptr, mask_ptr, offsets_ptr, m_ptr, v_ptr, partial_ptr, found_ptr, scale_ptr,
                         n, state_len, lr, beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction1,
                         bias_correction2_sqrt, eps, weight_decay, momentum, one_minus_dampening, threshold,
                         BLOCK: tl.constexpr, HAS_DECAY: tl.constexpr, SKIP_NONFINITE: tl.constexpr,
                         HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
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
    if HAS_FOUND_INF:  # GradScaler found an inf: nothing read or written
        on = on & (tl.load(found_ptr) == 0)
    p = tl.load(p_ptr + elem, mask=on, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + elem, mask=on, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + idx, mask=on, other=0.0)
    v = tl.load(v_ptr + idx, mask=on, other=0.0)
    if HAS_SCALE:  # GradScaler's unscale, fused
        g = tl.math.div_rn(g, tl.load(scale_ptr))
    if SKIP_NONFINITE:  # NaN/inf gradient (exponent all ones): untouched and counted
        bad = on & ((g.to(tl.uint32, bitcast=True) & 0x7F800000) == 0x7F800000)
        g = tl.where(bad, 0.0, g)
    else:
        bad = on & False
    u, m, v = direction(g, p, m, v, beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction1,
                        bias_correction2_sqrt, eps, weight_decay, momentum, one_minus_dampening, threshold,
                        "adamw", HAS_DECAY, False, False, False)
    write = on & (bad == 0)
    tl.store(m_ptr + idx, m, mask=write)
    tl.store(v_ptr + idx, v, mask=write)
    store_param(p_ptr + elem, p - lr * u, write)
    tl.store(partial_ptr + pid, tl.sum(bad.to(tl.int64), axis=0))


def masked_adamw_step_(param, grad, mask_words, block_offsets, exp_avg, exp_avg_sq, step, lr,
                       beta1, beta2, eps, weight_decay, skip_nonfinite=False, grad_scale=None, found_inf=None):
    n = param.numel()
    _checks.compact_state("masked_adamw_step_", mask_words, block_offsets, n, exp_avg.numel())
    blocks = block_offsets.numel()
    if blocks == 0 or exp_avg.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=param.device)  # nothing active: nothing moves
    # The one place scalars are derived (fp32-rounded), as for the CPL optimizers.
    s = reference_step.scalars(kinds.KINDS["adamw"], step, lr,
                               dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay))
    partial = torch.empty(blocks, dtype=torch.int64, device=param.device)
    found = (found_inf.reshape(1) != 0).to(torch.int32) if found_inf is not None else partial
    scale = grad_scale.reshape(1).to(torch.float32) if grad_scale is not None else partial
    _masked_adamw_kernel[(blocks,)](param, grad, mask_words, block_offsets, exp_avg, exp_avg_sq, partial, found,
                                    scale, n, exp_avg.numel(), s.lr, *scalar_args(s), BLOCK=OFFSET_BLOCK,
                                    HAS_DECAY=s.weight_decay != 0, SKIP_NONFINITE=bool(skip_nonfinite),
                                    HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
                                    **exact_fp(param.device))
    return partial.sum()


@triton.jit
def _mask_words_kernel(a_ptr, b_ptr, mask_ptr, counts_ptr, n, n_mask_words, B_IS_CODES: tl.constexpr,
                       BLOCK_WORDS: tl.constexpr):
    """One 1024-element offset block per program (BLOCK_WORDS = 32 words): its words, and its
    popcount into counts_ptr[pid]."""
    pid = tl.program_id(0).to(tl.int64)
    words = pid * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS).to(tl.int64)
    lanes = tl.arange(0, 32)
    elem = words[:, None] * 32 + lanes[None, :]
    valid = elem < n
    a = tl.load(a_ptr + elem, mask=valid, other=0.0).to(tl.float32)
    if B_IS_CODES:
        r = decode_signs(tl.load(b_ptr + elem // 16, mask=valid, other=0), (elem % 16).to(tl.int32))
    else:
        r = tl.load(b_ptr + elem, mask=valid, other=0.0).to(tl.float32)
    # On signs, as reference._collaborative: a product could underflow to -0 in fp32.
    conflicting = ((a > 0) & (r < 0)) | ((a < 0) & (r > 0))
    bit = (valid & (conflicting == 0)).to(tl.int64) << lanes[None, :].to(tl.int64)
    packed = tl.sum(bit, axis=1)
    tl.store(mask_ptr + words, packed.to(tl.int32), mask=words < n_mask_words)
    tl.store(counts_ptr + pid, tl.sum(tl.sum((valid & (conflicting == 0)).to(tl.int64), axis=1), axis=0))


def cpl_mask_words(a, b, codes, mask_out, block_offsets_out=None):
    n = a.numel()
    blocks = ref.num_offset_blocks(n)
    if blocks == 0:
        return torch.zeros((), dtype=torch.int64, device=a.device)
    # The per-block popcounts go straight into block_offsets_out when given (n / 1024 int64).
    counts = block_offsets_out if block_offsets_out is not None else torch.empty(blocks, dtype=torch.int64,
                                                                                 device=a.device)
    _mask_words_kernel[(blocks,)](a, b if b is not None else codes, mask_out, counts, n, ref.num_mask_words(n),
                                  B_IS_CODES=b is None, BLOCK_WORDS=OFFSET_BLOCK // 32)
    total = counts.sum()
    if block_offsets_out is not None:  # popcounts -> exclusive prefix sums, in place
        block_offsets_out.copy_(torch.cumsum(counts, 0) - counts)
    return total
