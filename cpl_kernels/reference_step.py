"""The step engine, reference: the CPL rule written once (`_step_one`) around a per-kind
direction (how the update u and the new state follow from g, p and the state).

This is the contract of `cpl::cpl_step_` (schema in csrc/ops.cpp) that every backend matches:
bit for bit in fp32 on CPU (the rounding rules are reference.py's module docstring: one correctly
rounded fp32 operation at a time, in the order written here).

Per parameter, with t = step:
  1. g = grad (fp32); with grad_scale, g = g / grad_scale (GradScaler's fused unscale).
  2. skip_nonfinite: elements whose g is NaN or inf are left untouched (no state update, no
     write), like frozen ones, and counted; g is taken as 0 there so no NaN spreads.
  3. pre: the kind's L2 decay (Adam, SGD: g = g + wd*p).
  4. criterion "gradient": conflicting = g*r < 0 (on signs); g = 0 there.
  5. direction: u and the new state from g, p, state (all elements, frozen or not).
  6. criterion "update": conflicting = u*r < 0.
  7. p = p - lr*u where the element is applied: not conflicting (criterion "update", or
     "gradient" with strict), everywhere (strict=False); never where g was not finite.
found_inf (GradScaler): a nonzero value skips the whole step: nothing is written.
Returns int64 [2, n_params]: row 0 the conflicting counts (as before: frozen, or zeroed for
strict=False; non-finite elements excluded), row 1 the non-finite gradient counts.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import kinds as K
from .reference import _add, _collaborative, _div, _mul, _sqrt, _sub, f32, unpack_signs


class Scalars(NamedTuple):
    """Every fp32 scalar one step of one kind needs, rounded once (as the C++ kernels do: derived
    in double, then rounded to fp32). Fields a kind does not use stay 0."""
    lr: float
    beta1: float = 0.0
    beta2: float = 0.0
    one_minus_beta1: float = 0.0
    one_minus_beta2: float = 0.0
    bias_correction1: float = 1.0
    bias_correction2_sqrt: float = 1.0
    eps: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.0
    one_minus_dampening: float = 1.0
    nesterov: bool = False
    init_buffer: bool = False
    threshold: float = 0.0       # MoFO: u is applied where |m_new| >= threshold


def scalars(kind: K.Kind, step: float, lr: float, hyper: dict[str, float]) -> Scalars:
    """The one place the reference derives a kind's scalars from its hyperparameters."""
    h = hyper
    if kind.name in ("adam", "adamw"):
        return Scalars(f32(lr), f32(h["beta1"]), f32(h["beta2"]), f32(1.0 - h["beta1"]),
                       f32(1.0 - h["beta2"]), f32(1.0 - math.pow(h["beta1"], step)),
                       f32(math.sqrt(1.0 - math.pow(h["beta2"], step))), f32(h["eps"]),
                       f32(h["weight_decay"]))
    if kind.name == "sgd":
        return Scalars(f32(lr), weight_decay=f32(h["weight_decay"]), momentum=f32(h["momentum"]),
                       one_minus_dampening=f32(1.0 - h["dampening"]), nesterov=bool(h["nesterov"]),
                       init_buffer=bool(h["init_buffer"]))
    if kind.name == "mofo":
        return scalars(K.KINDS["adamw"], step, lr, h)._replace(threshold=f32(h["threshold"]))
    if kind.name == "lion":
        return Scalars(f32(lr), f32(h["beta1"]), f32(h["beta2"]), f32(1.0 - h["beta1"]),
                       f32(1.0 - h["beta2"]), weight_decay=f32(h["weight_decay"]))
    raise AssertionError(kind)


# ---- directions: (g, p, s1, s2, scalars) -> (u, new s1, new s2); nothing written here ---------

class Direction(NamedTuple):
    pre: Callable[[Tensor, Tensor, Scalars], Tensor]            # g before the rule (L2 decay)
    step: Callable[..., tuple[Tensor, Tensor | None, Tensor | None]]


def _no_pre(g, p, s):
    return g


def _l2(g, p, s):
    return _add(g, _mul(s.weight_decay, p)) if s.weight_decay != 0 else g


def _adam(decoupled: bool):
    def step(g, p, m, v, s):
        m = _add(_mul(m, s.beta1), _mul(s.one_minus_beta1, g))
        v = _add(_mul(v, s.beta2), _mul(_mul(s.one_minus_beta2, g), g))
        u = _div(_div(m, s.bias_correction1), _add(_div(_sqrt(v), s.bias_correction2_sqrt), s.eps))
        if decoupled and s.weight_decay != 0:
            u = _add(u, _mul(s.weight_decay, p))
        return u, m, v
    return step


def _sgd(g, p, buf, _, s):
    if buf is None:  # no momentum
        return g, None, None
    buf = g.clone() if s.init_buffer else _add(_mul(buf, s.momentum), _mul(s.one_minus_dampening, g))
    u = _add(g, _mul(s.momentum, buf)) if s.nesterov else buf
    return u, buf, None


def _lion(g, p, m, _, s):
    c = _add(_mul(m, s.beta1), _mul(s.one_minus_beta1, g))
    u = torch.sign(c)
    if s.weight_decay != 0:
        u = _add(u, _mul(s.weight_decay, p))
    m = _add(_mul(m, s.beta2), _mul(s.one_minus_beta2, g))
    return u, m, None


def _mofo(g, p, m, v, s):
    """MoFO's filter around AdamW's direction: m and v are updated for every element (the paper's
    Algorithm 1); u is kept only where |m_new| >= threshold, +0 elsewhere (no update, no decay).
    |NaN| >= threshold is false: a NaN momentum is filtered out."""
    u, m, v = _adam(decoupled=True)(g, p, m, v, s)
    return torch.where(m.abs() >= s.threshold, u, torch.zeros_like(u)), m, v


DIRECTIONS: dict[str, Direction] = {
    "adam": Direction(_l2, _adam(decoupled=False)),
    "adamw": Direction(_no_pre, _adam(decoupled=True)),
    "sgd": Direction(_l2, _sgd),
    "lion": Direction(_no_pre, _lion),
    "mofo": Direction(_no_pre, _mofo),
}


# ---- the rule, once ----------------------------------------------------------------------------

def _step_one(param: Tensor, grad: Tensor, s1: Tensor | None, s2: Tensor | None, codes: Tensor | None,
              direction: Direction, s: Scalars, criterion: str, strict: bool, skip_nonfinite: bool,
              grad_scale: float | None) -> tuple[Tensor, Tensor]:
    p = param.reshape(-1).float()
    g = grad.reshape(-1).float()
    if grad_scale is not None:
        g = _div(g, grad_scale)
    bad = ~torch.isfinite(g) if skip_nonfinite else torch.zeros_like(g, dtype=torch.bool)
    if skip_nonfinite:
        g = torch.where(bad, torch.zeros_like(g), g)
    g = direction.pre(g, p, s)
    n = p.numel()
    ok = torch.ones(n, dtype=torch.bool, device=p.device)
    signs = unpack_signs(codes, n) if codes is not None else None
    if signs is not None and criterion == "gradient":
        ok = _collaborative(g, signs)
        g = torch.where(ok, g, torch.zeros_like(g))
    old1 = None if s1 is None else s1.view(-1)
    old2 = None if s2 is None else s2.view(-1)
    u, new1, new2 = direction.step(g, p, old1, old2, s)
    if signs is not None and criterion == "update":
        ok = _collaborative(u, signs)
    apply = (ok if (criterion == "update" or strict) else torch.ones_like(ok)) & ~bad
    for old, new in ((old1, new1), (old2, new2)):
        if old is not None and new is not None:
            old.copy_(torch.where(bad, old, new))
    new_p = torch.where(apply, _sub(p, _mul(s.lr, u)), p)
    param.view(-1).copy_(new_p.to(param.dtype))
    return (~ok & ~bad).sum(), bad.sum()


def _host(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def cpl_step_(params: Sequence[Tensor], grads: Sequence[Tensor], state1: Sequence[Tensor],
              state2: Sequence[Tensor], codes: Sequence[Tensor | None], kind: str, step, lr,
              hyper: Sequence[float], criterion: str, strict: bool, skip_nonfinite: bool,
              grad_scale: Tensor | None, found_inf: Tensor | None) -> Tensor:
    """The reference of cpl::cpl_step_ (module docstring). Inputs are validated by the caller."""
    k = K.KINDS[kind]
    n = len(params)
    out = torch.zeros(2, n, dtype=torch.int64)
    if n == 0 or (found_inf is not None and _host(found_inf) != 0):
        return out
    s = scalars(k, _host(step), _host(lr), dict(zip(k.hyper, hyper)))
    direction = DIRECTIONS[kind]
    scale = None if grad_scale is None else f32(_host(grad_scale))
    codes = list(codes) if codes else [None] * n
    for i in range(n):
        s1 = state1[i] if len(state1) else None
        s2 = state2[i] if len(state2) else None
        conflicting, nonfinite = _step_one(params[i], grads[i], s1, s2, codes[i], direction, s,
                                           criterion, strict, skip_nonfinite, scale)
        out[0, i], out[1, i] = conflicting, nonfinite
    return out


def cpl_step_8bit_(params: Sequence[Tensor], grads: Sequence[Tensor], state1: Sequence[Tensor],
                   absmax1: Sequence[Tensor], state2: Sequence[Tensor], absmax2: Sequence[Tensor],
                   qmaps: Tensor, codes: Sequence[Tensor | None], kind: str, step, lr,
                   hyper: Sequence[float], criterion: str, strict: bool, skip_nonfinite: bool,
                   grad_scale: Tensor | None, found_inf: Tensor | None) -> Tensor:
    """The reference of cpl::cpl_step_8bit_: cpl_step_ on 8-bit blockwise state (cpl_kernels/
    quant8.py). Per parameter: dequantize each slot to fp32 (qmaps[k, 0][code] * absmax), run the
    rule above on those values (state of non-finite elements keeps its dequantized value), then
    requantize each slot block by block (quant8.quantize_). found_inf: nothing is written, codes
    and absmax included. Inputs are validated by the caller."""
    from . import quant8

    n = len(params)
    if n == 0 or (found_inf is not None and _host(found_inf) != 0):
        return torch.zeros(2, n, dtype=torch.int64)
    used = 2 if len(state2) else (1 if len(state1) else 0)
    slots = [(state1, absmax1, qmaps[0, 0]), (state2, absmax2, qmaps[1, 0])][:used]
    fp32 = [[quant8.dequantize(q[i], a[i], m) for i in range(n)] for q, a, m in slots]
    fp32 += [[]] * (2 - used)
    out = cpl_step_(params, grads, fp32[0], fp32[1], codes, kind, step, lr, hyper, criterion, strict,
                    skip_nonfinite, grad_scale, None)
    for (q, a, m), values in zip(slots, fp32):
        for i in range(n):
            quant8.quantize_(values[i], q[i], a[i], m)
    return out
