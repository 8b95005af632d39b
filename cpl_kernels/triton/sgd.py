"""cpl_sgd_step_: fused SGD (+momentum, dampening, Nesterov, L2 decay) with the CPL rule.

fp32 arithmetic as reference.cpl_sgd_step_: each operation rounded on its own (launch options
exact_fp), scalars rounded to fp32 on the host as the reference rounds them."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference as ref
from ._common import (STEP_BLOCK_WORDS, collaborative, decode_signs, dummy_int32, exact_fp, grid,
                      store_param)


@triton.jit
def sgd_update(p, g, buf, s, valid, lr, momentum, one_minus_dampening, weight_decay,
               HAS_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr, INIT_BUFFER: tl.constexpr,
               NESTEROV: tl.constexpr, CRITERION_UPDATE: tl.constexpr, STRICT: tl.constexpr):
    """Returns (new p, new buf, conflicting) for fp32 tiles, as reference.cpl_sgd_step_."""
    if HAS_DECAY:
        g = g + weight_decay * p
    if CRITERION_UPDATE:
        ok = valid | True
    else:
        ok = collaborative(g, s)
        g = tl.where(ok, g, 0.0)
    u = g
    if HAS_MOMENTUM:
        if INIT_BUFFER:  # torch.optim.SGD: the first buffer is the gradient itself
            buf = g
        else:
            buf = buf * momentum + one_minus_dampening * g
        if NESTEROV:
            u = g + momentum * buf
        else:
            u = buf
    if CRITERION_UPDATE:
        ok = collaborative(u, s)
    if CRITERION_UPDATE or STRICT:
        new_p = tl.where(ok, p - lr * u, p)
    else:
        new_p = p - lr * u
    return new_p, buf, valid & (ok == 0)


@triton.jit
def _sgd_kernel(p_ptr, g_ptr, buf_ptr, codes_ptr, partial_ptr, n, lr, momentum, one_minus_dampening,
                weight_decay, HAS_CODES: tl.constexpr, HAS_DECAY: tl.constexpr,
                HAS_MOMENTUM: tl.constexpr, INIT_BUFFER: tl.constexpr, NESTEROV: tl.constexpr,
                CRITERION_UPDATE: tl.constexpr, STRICT: tl.constexpr, BLOCK_WORDS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    words = pid * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS).to(tl.int64)
    lanes = tl.arange(0, 16)
    elem = words[:, None] * 16 + lanes[None, :]
    valid = elem < n
    p = tl.load(p_ptr + elem, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + elem, mask=valid, other=0.0).to(tl.float32)
    if HAS_MOMENTUM and not INIT_BUFFER:
        buf = tl.load(buf_ptr + elem, mask=valid, other=0.0)
    else:
        buf = tl.zeros_like(p)
    if HAS_CODES:
        cw = tl.load(codes_ptr + words, mask=words * 16 < n, other=0)
        s = decode_signs(cw[:, None], lanes[None, :])
    else:
        s = tl.zeros_like(p)
    new_p, buf, conflicting = sgd_update(p, g, buf, s, valid, lr, momentum, one_minus_dampening,
                                         weight_decay, HAS_DECAY, HAS_MOMENTUM, INIT_BUFFER,
                                         NESTEROV, CRITERION_UPDATE, STRICT)
    if HAS_MOMENTUM:
        tl.store(buf_ptr + elem, buf, mask=valid)
    store_param(p_ptr + elem, new_p, valid)
    tl.store(partial_ptr + pid, tl.sum(conflicting.to(tl.int64)))


def cpl_sgd_step_(param, grad, momentum_buffer, codes, lr, momentum, dampening, weight_decay,
                  nesterov, init_buffer, criterion, strict):
    n = param.numel()
    programs = grid(n, STEP_BLOCK_WORDS * 16)[0]
    if programs == 0:
        return torch.zeros((), dtype=torch.int64, device=param.device)
    partial = torch.empty(programs, dtype=torch.int64, device=param.device)
    has_momentum = momentum != 0
    buf = momentum_buffer if has_momentum else param  # never read or written without momentum
    _sgd_kernel[(programs,)](
        param, grad, buf, codes if codes is not None else dummy_int32(param.device), partial, n,
        ref.f32(lr), ref.f32(momentum), ref.f32(1.0 - dampening), ref.f32(weight_decay),
        HAS_CODES=codes is not None,
        HAS_DECAY=weight_decay != 0, HAS_MOMENTUM=has_momentum, INIT_BUFFER=bool(init_buffer),
        NESTEROV=bool(nesterov), CRITERION_UPDATE=criterion == "update", STRICT=bool(strict),
        BLOCK_WORDS=STEP_BLOCK_WORDS, **exact_fp(param.device))
    return partial.sum()
