"""Per-kind parts of the Triton step engine (cpl_kernels/triton/step.py): how the update u and the
new state follow from g, p and the state, for each kind of cpl_kernels/kinds.py. The CPL rule
around them is written once, in step.py's kernel; nothing here writes memory.

Adding a kind touches, besides the shared Python (kinds.py: name, hyper order, slots;
reference_step.py: scalars() and its direction, the contract), ONE Triton file: this one
(a branch in `pre` if it rewrites g, a branch in `direction`, and its flags in `constexprs`).
The CUDA engine likewise needs one: csrc/cuda/directions.cuh.

Arithmetic (the reference's rounding, cpl_kernels/reference.py docstring): every fp32 operation
is rounded on its own, in reference_step.py's order. The kernel is launched with
enable_fp_fusion=False (_common.exact_fp), so `a * b + c` stays a multiply then an add; division
and square root are the correctly rounded div_rn/sqrt_rn (a plain `/` or tl.sqrt may be
approximate on a GPU). Scalars arrive already rounded to fp32 (reference_step.scalars).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..reference_step import Scalars


@triton.jit
def pre(g, p, weight_decay, KIND: tl.constexpr, HAS_DECAY: tl.constexpr):
    """g before the rule: torch.optim.Adam's and SGD's L2 decay, g + wd*p (reference_step._l2)."""
    if (KIND == "adam" or KIND == "sgd") and HAS_DECAY:
        g = g + weight_decay * p
    return g


@triton.jit
def _lion_sign(c):
    """torch.sign: +1, -1, and 0 for +-0 and NaN."""
    return tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))


@triton.jit
def direction(g, p, s1, s2, beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction1,
              bias_correction2_sqrt, eps, weight_decay, momentum, one_minus_dampening, threshold,
              KIND: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
              NESTEROV: tl.constexpr, INIT_BUFFER: tl.constexpr):
    """(u, new s1, new s2) from fp32 tiles (reference_step.DIRECTIONS[KIND].step). Slots a kind
    does not use come back as they went in (the kernel neither loads nor stores them)."""
    if KIND == "adam" or KIND == "adamw" or KIND == "mofo":
        m = s1 * beta1 + one_minus_beta1 * g
        v = s2 * beta2 + (one_minus_beta2 * g) * g
        u = tl.math.div_rn(tl.math.div_rn(m, bias_correction1),
                           tl.math.div_rn(tl.math.sqrt_rn(v), bias_correction2_sqrt) + eps)
        if KIND != "adam" and HAS_DECAY:  # decoupled decay is part of u: frozen means not decayed
            u = u + weight_decay * p
        if KIND == "mofo":  # MoFO's filter: u only where |m_new| >= threshold (false for NaN)
            u = tl.where(tl.abs(m) >= threshold, u, 0.0)
        s1 = m
        s2 = v
    elif KIND == "sgd":
        u = g
        if HAS_MOMENTUM:
            if INIT_BUFFER:  # torch.optim.SGD: the first buffer is the gradient itself
                s1 = g
            else:
                s1 = s1 * momentum + one_minus_dampening * g
            if NESTEROV:
                u = g + momentum * s1
            else:
                u = s1
    else:
        tl.static_assert(KIND == "lion", "unknown kind")
        u = _lion_sign(s1 * beta1 + one_minus_beta1 * g)
        if HAS_DECAY:
            u = u + weight_decay * p
        s1 = s1 * beta2 + one_minus_beta2 * g
    return u, s1, s2


def constexprs(kind: str, s: Scalars, slots: int) -> dict:
    """The kernel's per-kind compile-time flags. LOAD_S1/LOAD_S2: whether the old state is read
    (SGD's first step overwrites its buffer without reading it); HAS_S1/HAS_S2: whether it is
    written (the state slots the caller passed, kinds.state_slots)."""
    return dict(KIND=kind, HAS_DECAY=s.weight_decay != 0, HAS_MOMENTUM=kind == "sgd" and slots >= 1,
                NESTEROV=bool(s.nesterov), INIT_BUFFER=bool(s.init_buffer),
                HAS_S1=slots >= 1, HAS_S2=slots >= 2,
                LOAD_S1=slots >= 1 and not (kind == "sgd" and s.init_buffer), LOAD_S2=slots >= 2)


def scalar_args(s: Scalars) -> tuple[float, ...]:
    """The fp32 scalars `direction` takes, in its order (unused ones are passed and ignored)."""
    return (s.beta1, s.beta2, s.one_minus_beta1, s.one_minus_beta2, s.bias_correction1,
            s.bias_correction2_sqrt, s.eps, s.weight_decay, s.momentum, s.one_minus_dampening,
            s.threshold)
