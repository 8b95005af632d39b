"""cpl_adam_step_: one fused pass (read p, g, m, v, codes; write p, m, v) per Adam/AdamW step.

The element math is `adam_update` below. It follows cpl_kernels/reference.py operation by
operation in fp32, each operation rounded on its own (launch options exact_fp), with the
scalars the reference rounds (reference.adam_hyper). There is no multi-tensor Triton kernel:
cpl_kernels/multi_tensor.py loops over this single-tensor kernel (one launch per tensor).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference as ref
from ._common import (STEP_BLOCK_WORDS, adam_direction, adam_state, collaborative, decode_signs,
                      dummy_int32, exact_fp, grid, store_param)


@triton.jit
def adam_update(p, g, m, v, s, valid, lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                bc1, bc2_sqrt, eps, weight_decay, L2_DECAY: tl.constexpr,
                DECOUPLED_DECAY: tl.constexpr, CRITERION_UPDATE: tl.constexpr,
                STRICT: tl.constexpr):
    """Returns (new p, new m, new v, conflicting) for fp32 tiles; s = sign of r (0 if no codes)."""
    if L2_DECAY:  # torch.optim.Adam folds the decay into the gradient
        g = g + weight_decay * p
    if CRITERION_UPDATE:
        ok = valid | True
    else:
        ok = collaborative(g, s)
        g = tl.where(ok, g, 0.0)  # the state only accumulates collaborative gradient
    m, v = adam_state(g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2)
    u = adam_direction(m, v, bc1, bc2_sqrt, eps)
    if DECOUPLED_DECAY:
        u = u + weight_decay * p
    if CRITERION_UPDATE:
        ok = collaborative(u, s)
    if CRITERION_UPDATE or STRICT:
        new_p = tl.where(ok, p - lr * u, p)
    else:
        new_p = p - lr * u
    return new_p, m, v, valid & (ok == 0)


@triton.jit
def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, codes_ptr, partial_ptr, n, lr, beta1, one_minus_beta1,
                 beta2, one_minus_beta2, bc1, bc2_sqrt, eps, weight_decay,
                 HAS_CODES: tl.constexpr, L2_DECAY: tl.constexpr, DECOUPLED_DECAY: tl.constexpr,
                 CRITERION_UPDATE: tl.constexpr, STRICT: tl.constexpr, BLOCK_WORDS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    words = pid * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS).to(tl.int64)
    lanes = tl.arange(0, 16)
    elem = words[:, None] * 16 + lanes[None, :]
    valid = elem < n
    p = tl.load(p_ptr + elem, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + elem, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + elem, mask=valid, other=0.0)
    v = tl.load(v_ptr + elem, mask=valid, other=0.0)
    if HAS_CODES:
        cw = tl.load(codes_ptr + words, mask=words * 16 < n, other=0)
        s = decode_signs(cw[:, None], lanes[None, :])
    else:
        s = tl.zeros_like(p)
    new_p, m, v, conflicting = adam_update(
        p, g, m, v, s, valid, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, bc1, bc2_sqrt,
        eps, weight_decay, L2_DECAY, DECOUPLED_DECAY, CRITERION_UPDATE, STRICT)
    tl.store(m_ptr + elem, m, mask=valid)
    tl.store(v_ptr + elem, v, mask=valid)
    store_param(p_ptr + elem, new_p, valid)
    tl.store(partial_ptr + pid, tl.sum(conflicting.to(tl.int64)))


def cpl_adam_step_(param, grad, exp_avg, exp_avg_sq, codes, step, lr, beta1, beta2, eps,
                   weight_decay, decoupled, criterion, strict):
    n = param.numel()
    per_program = STEP_BLOCK_WORDS * 16
    programs = grid(n, per_program)[0]
    if programs == 0:
        return torch.zeros((), dtype=torch.int64, device=param.device)
    partial = torch.empty(programs, dtype=torch.int64, device=param.device)
    h = ref.adam_hyper(step, lr, beta1, beta2, eps, weight_decay)  # fp32 values: passed exactly
    _adam_kernel[(programs,)](
        param, grad, exp_avg, exp_avg_sq, codes if codes is not None else dummy_int32(param.device),
        partial, n, h.lr, h.beta1, h.one_minus_beta1, h.beta2, h.one_minus_beta2, h.bias_correction1,
        h.bias_correction2_sqrt, h.eps, h.weight_decay,
        HAS_CODES=codes is not None, L2_DECAY=(not decoupled) and weight_decay != 0,
        DECOUPLED_DECAY=decoupled and weight_decay != 0,
        CRITERION_UPDATE=criterion == "update", STRICT=bool(strict), BLOCK_WORDS=STEP_BLOCK_WORDS,
        **exact_fp(param.device))
    return partial.sum()
