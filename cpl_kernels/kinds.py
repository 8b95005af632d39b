"""The optimizer kinds the step engine knows, and the one place (in Python) their
hyperparameters are laid out, validated and rounded.

The step op `cpl::cpl_step_` takes `kind` (a name below) and `hyper`, a list of floats in the
order KINDS[kind].hyper gives. Every backend reads them in that order (csrc/cpu/directions.h,
csrc/cuda/directions.cuh, cpl_kernels/triton/directions.py); docs/design.md section 7 says how to
add a kind.

State slots: `state1` and `state2` are fp32 tensors shaped like the parameter, their meaning
set by the kind (Adam, MoFO: m, v; SGD with momentum: the buffer; Lion: m). A kind that needs fewer
slots gets empty lists for the others.
"""
from __future__ import annotations

import math
from typing import NamedTuple


class Kind(NamedTuple):
    name: str
    hyper: tuple[str, ...]       # the order of the `hyper` list
    states: int                  # state slots used (SGD: 1 with momentum, else 0)
    uses_step: bool              # bias corrections need the step count


KINDS: dict[str, Kind] = {
    # L2 decay: g += weight_decay * p before the state update (torch.optim.Adam).
    "adam": Kind("adam", ("beta1", "beta2", "eps", "weight_decay"), 2, True),
    # Decoupled decay: u += weight_decay * p (torch.optim.AdamW).
    "adamw": Kind("adamw", ("beta1", "beta2", "eps", "weight_decay"), 2, True),
    # torch.optim.SGD; nesterov and init_buffer (first step: buffer = gradient) are 0.0 or 1.0.
    "sgd": Kind("sgd", ("momentum", "dampening", "weight_decay", "nesterov", "init_buffer"), 1, False),
    # Lion (Chen et al. 2023): u = sign(b1*m + (1-b1)*g) + wd*p; m = b2*m + (1-b2)*g.
    "lion": Kind("lion", ("beta1", "beta2", "weight_decay"), 1, False),
    # MoFO (Chen et al., TMLR 2025): AdamW's m, v and u for every element, u applied only where
    # |m_new| >= threshold (the tensor's top-alpha momentum, chosen by the caller:
    # cpl_kernels/optim/mofo.py); elsewhere u = +0, so the element keeps its value, undecayed.
    "mofo": Kind("mofo", ("beta1", "beta2", "eps", "weight_decay", "threshold"), 2, True),
}


def kind_of(op: str, name: str) -> Kind:
    kind = KINDS.get(name)
    if kind is None:
        raise ValueError(f"cpl.{op}: argument 'kind' must be one of {tuple(KINDS)}, got {name!r}")
    return kind


def state_slots(kind: Kind, hyper) -> int:
    """State tensors per parameter: SGD keeps its buffer only with momentum."""
    if kind.name == "sgd":
        return 1 if hyper[0] != 0 else 0
    return kind.states


def check_hyper(op: str, kind: Kind, hyper) -> dict[str, float]:
    """The named hyperparameters, validated (errors name the argument)."""
    if len(hyper) != len(kind.hyper):
        raise ValueError(f"cpl.{op}: argument 'hyper' for kind {kind.name!r} holds {len(hyper)} values; "
                         f"expected {len(kind.hyper)}: {', '.join(kind.hyper)}")
    values = {}
    for name, v in zip(kind.hyper, hyper):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"cpl.{op}: hyperparameter '{name}' must be a finite number, got {v!r}")
        values[name] = float(v)
    for b in ("beta1", "beta2"):
        if b in values and not 0.0 <= values[b] < 1.0:
            raise ValueError(f"cpl.{op}: hyperparameter '{b}' must be in [0, 1), got {values[b]}")
    for name in ("eps", "weight_decay", "momentum", "dampening", "threshold"):
        if name in values and values[name] < 0:
            raise ValueError(f"cpl.{op}: hyperparameter '{name}' must be >= 0, got {values[name]}")
    for flag in ("nesterov", "init_buffer"):
        if flag in values and values[flag] not in (0.0, 1.0):
            raise ValueError(f"cpl.{op}: hyperparameter '{flag}' must be 0 or 1, got {values[flag]}")
    if values.get("nesterov") and (values["momentum"] <= 0 or values["dampening"] != 0):
        raise ValueError(f"cpl.{op}: nesterov needs momentum > 0 and dampening == 0")
    return values
