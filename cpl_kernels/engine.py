"""The step engine's entry point: `cpl_step_`, one call for every parameter of one optimizer
kind in a model step (the one native step op, `cpl::cpl_step_`, on every backend).

    counts = cpl_step_(params, grads, state1, state2, codes, "adamw", step, lr,
                       [beta1, beta2, eps, weight_decay], criterion="gradient", strict=True)

Arguments (the contract is cpl_kernels/reference_step.py's docstring):
  params, grads      lists of tensors (fp32, bf16 or fp16, contiguous, one device, grad dtype =
                     param dtype); params are updated in place.
  state1, state2     fp32 state tensors shaped like each param, or empty lists for slots the kind
                     does not use (kinds.py: Adam m/v, SGD with momentum its buffer, Lion m).
  codes              None, or a list of sign codes / None per param (None: no reference).
  kind, hyper        a name of kinds.KINDS and its hyperparameters in the order it lists.
  step, lr           numbers or 1-element tensors (on CUDA device tensors keep the call graph-
                     capturable); step counts from 1 (used by Adam's bias corrections).
  skip_nonfinite     elements whose gradient is NaN or inf are left untouched and counted.
  grad_scale, found_inf  torch.amp.GradScaler's fused protocol: gradients are divided by
                     grad_scale on the fly; a nonzero found_inf skips the whole step.
Returns int64 [2, len(params)]: conflicting counts, then non-finite gradient counts.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _backend
from . import _checks as check
from . import kinds as K
from . import reference_step

OP = "cpl_step_"


def _as_list(name: str, xs, n: int | None = None, op: str = OP) -> list:
    if isinstance(xs, (Tensor, str, bytes)) or not isinstance(xs, Sequence):
        raise ValueError(f"cpl.{op}: argument '{name}' must be a list of tensors, got {type(xs).__name__}")
    xs = list(xs)
    if n is not None and len(xs) != n:
        raise ValueError(f"cpl.{op}: argument '{name}' has {len(xs)} entries but 'params' has {n}")
    return xs


def _scalar(name: str, x, device: torch.device, at_least: float, op: str = OP) -> Tensor:
    """A float64 0-dim tensor on `device` holding x, validated (x may be a number or a tensor)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"cpl.{op}: argument '{name}' must hold one value, got {x.numel()}")
        if x.device != device:
            raise ValueError(f"cpl.{op}: argument '{name}' is on {x.device} but the params are on {device}")
        if x.device.type == "cpu":
            check.hyper(op, **{name: float(x.item())})
        return x.reshape(())
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < at_least:
        raise ValueError(f"cpl.{op}: argument '{name}' must be a finite number >= {at_least:g}, got {x!r}")
    return torch.tensor(float(x), dtype=torch.float64, device=device)


def _amp_tensor(name: str, t: Tensor | None, device: torch.device, op: str = OP) -> Tensor | None:
    if t is None:
        return None
    if not isinstance(t, Tensor) or t.numel() != 1 or not t.is_floating_point():
        raise ValueError(f"cpl.{op}: argument '{name}' must be a one-element floating-point tensor")
    if t.device != device:
        raise ValueError(f"cpl.{op}: argument '{name}' is on {t.device} but the params are on {device}")
    return t


def _check_common(params, grads, codes, kind, hyper, criterion, strict, skip_nonfinite, op=OP):
    """The list-level checks (lengths, kind, hyper, criterion, flags): once per call."""
    params = _as_list("params", params, op=op)
    n = len(params)
    grads = _as_list("grads", grads, n, op)
    k = K.kind_of(op, kind)
    K.check_hyper(op, k, hyper)
    codes = [None] * n if codes is None else _as_list("codes", codes, n, op)
    check.criterion(op, criterion, strict)
    if not isinstance(strict, bool) or not isinstance(skip_nonfinite, bool):
        raise ValueError(f"cpl.{op}: arguments 'strict' and 'skip_nonfinite' must be bools")
    return params, grads, k, codes


def _check_entries(params, grads, codes, native: bool, op=OP) -> None:
    """Per entry: params, grads and codes. A native kernel validates every entry itself, with these
    messages, before writing anything (csrc/cpu/step.cpp, tests/test_engine_native.py), so for it
    only what routes the call is checked here: every entry a dense tensor on the params' device (a
    sparse, meta or CUDA entry would send the whole call to another kernel). The full checks cost ~10 us an
    entry in Python, 0.35 ms a step for a 35-tensor model."""
    if native:
        device = params[0].device
        check.all_on_device(op, "params", params, device)
        check.all_on_device(op, "grads", grads, device)
        check.all_on_device(op, "codes", codes, device, none_ok=True)
        return
    for i, (p, g) in enumerate(zip(params, grads)):
        check.tensor(op, f"params[{i}]", p, dtypes=check.PARAM_DTYPES, like=params[0])
        check.tensor(op, f"grads[{i}]", g, dtypes=check.PARAM_DTYPES, like=p)
        if g.dtype != p.dtype or g.shape != p.shape:
            raise ValueError(f"cpl.{op}: argument 'grads[{i}]' has dtype {g.dtype} and shape {tuple(g.shape)} "
                             f"but 'params[{i}]' has {p.dtype}, {tuple(p.shape)}; they must match")
        if codes[i] is not None:
            check.codes(op, f"codes[{i}]", codes[i], p.numel(), like=p)


def _backend_fn(params, op: str, triton_name: str, reference_fn):
    """(the kernel serving the params' device, whether it is native). params[0] is checked here:
    its device picks the backend."""
    check.tensor(op, "params[0]", params[0])
    device = params[0].device
    backend = _backend.choose(device)
    if _backend.native_op(op, backend):
        return getattr(torch.ops.cpl, op), True
    if backend in ("cpp", "cuda"):
        # A library built before this op existed: as a library that fails to load, loud, once.
        _backend.warn_fallback(f"cpl.{op} (cpl_kernels._C has no {backend} kernel for it: rebuild "
                               "with `pip install --no-build-isolation -e .`)")
        return reference_fn, False
    if backend == "triton":
        from .triton import step as triton_step
        return getattr(triton_step, triton_name), False
    return reference_fn, False


def cpl_step_(
    params: Sequence[Tensor], grads: Sequence[Tensor], state1: Sequence[Tensor],
    state2: Sequence[Tensor], codes: Sequence[Tensor | None] | None, kind: str, step, lr,
    hyper: Sequence[float], criterion: str = "update", strict: bool = True,
    skip_nonfinite: bool = True, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
) -> Tensor:
    """The fused CPL step of `kind` over lists of tensors (module docstring). Every argument is
    validated before anything is written."""
    params, grads, k, codes = _check_common(params, grads, codes, kind, hyper, criterion, strict,
                                            skip_nonfinite)
    n = len(params)
    slots = K.state_slots(k, hyper)
    s1 = _as_list("state1", state1, n if slots >= 1 else 0)
    s2 = _as_list("state2", state2, n if slots >= 2 else 0)
    if n == 0:
        return torch.zeros(2, 0, dtype=torch.int64)
    fn, native = _backend_fn(params, OP, "cpl_step_", reference_step.cpl_step_)
    _check_entries(params, grads, codes, native)
    device = params[0].device
    for name, slot in (("state1", s1), ("state2", s2)):
        if native:
            check.all_on_device(OP, name, slot, device)
            continue
        for i, t in enumerate(slot):
            check.fp32_state(OP, f"{name}[{i}]", t, params[i])
    step_t = _scalar("step", step, device, 1.0 if k.uses_step else 0.0)
    lr_t = _scalar("lr", lr, device, 0.0)
    grad_scale = _amp_tensor("grad_scale", grad_scale, device)
    found_inf = _amp_tensor("found_inf", found_inf, device)
    hyper = [float(h) for h in hyper]
    return fn(params, grads, s1, s2, codes, kind, step_t, lr_t, hyper, criterion, strict,
              skip_nonfinite, grad_scale, found_inf)


OP8 = "cpl_step_8bit_"


def cpl_step_8bit_(
    params: Sequence[Tensor], grads: Sequence[Tensor], state1: Sequence[Tensor],
    absmax1: Sequence[Tensor], state2: Sequence[Tensor], absmax2: Sequence[Tensor], qmaps: Tensor,
    codes: Sequence[Tensor | None] | None, kind: str, step, lr, hyper: Sequence[float],
    criterion: str = "update", strict: bool = True, skip_nonfinite: bool = True,
    grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
) -> Tensor:
    """cpl_step_ with 8-bit blockwise state (cpl_kernels/quant8.py, docs/design.md section 8):
    state1/state2 are uint8 codes with one element per parameter element, absmax1/absmax2 fp32
    with one entry per block of 256 elements, qmaps fp32 [2, 2, 256] (quant8.qmaps: per slot, the
    map and its thresholds). Unused slots get empty lists. Validated before anything is written."""
    from . import quant8

    op = OP8
    params, grads, k, codes = _check_common(params, grads, codes, kind, hyper, criterion, strict,
                                            skip_nonfinite, op)
    n = len(params)
    slots = K.state_slots(k, hyper)
    lists = []
    for name, xs, used in (("state1", state1, slots >= 1), ("absmax1", absmax1, slots >= 1),
                           ("state2", state2, slots >= 2), ("absmax2", absmax2, slots >= 2)):
        lists.append(_as_list(name, xs, n if used else 0, op))
    q1, a1, q2, a2 = lists
    if n == 0:
        return torch.zeros(2, 0, dtype=torch.int64)
    fn, native = _backend_fn(params, op, "cpl_step_8bit_", reference_step.cpl_step_8bit_)
    _check_entries(params, grads, codes, native, op)
    device = params[0].device
    check.tensor(op, "qmaps", qmaps, dtypes=(torch.float32,), like=params[0], numel=4 * quant8.BLOCK)
    if native:
        for name, xs in (("state1", q1), ("absmax1", a1), ("state2", q2), ("absmax2", a2)):
            check.all_on_device(op, name, xs, device)
    else:
        for i, p in enumerate(params):
            for qname, q, aname, a in (("state1", q1, "absmax1", a1), ("state2", q2, "absmax2", a2)):
                if q:
                    check.tensor(op, f"{qname}[{i}]", q[i], dtypes=(torch.uint8,), like=p, numel=p.numel())
                    check.tensor(op, f"{aname}[{i}]", a[i], dtypes=(torch.float32,), like=p,
                                 numel=quant8.num_blocks(p.numel()))
    step_t = _scalar("step", step, device, 1.0 if k.uses_step else 0.0, op)
    lr_t = _scalar("lr", lr, device, 0.0, op)
    grad_scale = _amp_tensor("grad_scale", grad_scale, device, op)
    found_inf = _amp_tensor("found_inf", found_inf, device, op)
    hyper = [float(h) for h in hyper]
    return fn(params, grads, q1, a1, q2, a2, qmaps.reshape(2, 2, quant8.BLOCK), codes, kind, step_t,
              lr_t, hyper, criterion, strict, skip_nonfinite, grad_scale, found_inf)
