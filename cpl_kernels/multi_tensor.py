"""Multi-tensor CPL steps: one call for every parameter of a model step.

On CUDA tensors with the native kernels built, one `torch.ops.cpl.*_multi_` call updates all
tensors in a bounded number of launches per dtype (tensor tables as torch's fused optimizers),
reading lr and step from device tensors so the whole step can be captured in a CUDA graph.
On CPU tensors the native op is a C++ loop over the single-tensor kernels (one dispatcher call).
Everywhere else (Triton, reference) the step loops over the single-tensor ops in Python;
the Triton path is that loop for now (one launch per tensor, lr/step read on the host), not a
multi-tensor Triton kernel.

Both functions return the conflicting count of every tensor as int64[len(params)].
`step` is the step count t of this update (already incremented), as in the single-tensor ops.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _backend
from . import _checks as check
from . import ops
from . import reference as ref


def _as_list(name: str, op: str, xs, n: int, optional: bool = False) -> list:
    if xs is None and optional:
        return [None] * n
    if not isinstance(xs, Sequence) or isinstance(xs, Tensor):
        raise ValueError(f"cpl.{op}: argument '{name}' must be a list of tensors, got {type(xs).__name__}")
    xs = list(xs)
    if len(xs) != n:
        raise ValueError(f"cpl.{op}: argument '{name}' has {len(xs)} entries but 'params' has {n}")
    return xs


def _scalar_tensor(op: str, name: str, x, device: torch.device) -> Tensor:
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"cpl.{op}: argument '{name}' must hold one value, got {x.numel()}")
        if x.device != device:
            raise ValueError(f"cpl.{op}: argument '{name}' is on {x.device} but the params are on {device}")
        return x
    return torch.tensor(float(x), dtype=torch.float64, device=device)


def _scalar_float(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)  # a host sync for tensors


def _native_multi(op: str, device: torch.device) -> bool:
    """The native multi-tensor op serves this device: CUDA (tensor tables) or CPU (a C++ loop)."""
    key = {"cuda": "CUDA", "cpp": "CPU"}.get(_backend.choose(device))
    return key is not None and _backend.native_loaded() and \
        torch._C._dispatch_has_kernel_for_dispatch_key(f"cpl::{op}", key)


def cpl_adam_step_multi_(
    params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor], codes: Sequence[Tensor | None] | None, step, lr,
    beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
    criterion: str = "update", strict: bool = True,
) -> Tensor:
    """cpl_adam_step_ on every (param, grad, exp_avg, exp_avg_sq, codes) tuple; codes may be
    None (no reference anywhere) or hold None for tensors without one."""
    op = "cpl_adam_step_multi_"
    params = _as_list("params", op, params, len(params) if isinstance(params, Sequence) else -1)
    n = len(params)
    grads, exp_avgs, exp_avg_sqs = (_as_list(k, op, v, n) for k, v in
                                    (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)))
    codes = _as_list("codes", op, codes, n, optional=True)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    device = params[0].device
    for p, g, m, v, c in zip(params, grads, exp_avgs, exp_avg_sqs, codes):
        check.param_and_grad(op, p, g)
        check.tensor(op, "params", p, like=params[0])
        check.fp32_state(op, "exp_avgs", m, p)
        check.fp32_state(op, "exp_avg_sqs", v, p)
        if c is not None:
            check.codes(op, "codes", c, p.numel(), like=p)
    check.criterion(op, criterion, strict)
    check.hyper(op, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    if _native_multi(op, device):
        return torch.ops.cpl.cpl_adam_step_multi_(
            params, grads, exp_avgs, exp_avg_sqs, codes, _scalar_tensor(op, "step", step, device),
            _scalar_tensor(op, "lr", lr, device), float(beta1), float(beta2), float(eps),
            float(weight_decay), bool(decoupled), criterion, bool(strict))
    step_f, lr_f = _scalar_float(step), _scalar_float(lr)
    check.hyper(op, step=step_f, lr=lr_f)
    # Every tensor was validated above: call the backend directly, not the validating wrapper.
    counts = [ops.kernel("cpl_adam_step_", p.device)(
                  p, g, m, v, c, step_f, lr_f, float(beta1), float(beta2), float(eps),
                  float(weight_decay), bool(decoupled), criterion, bool(strict))
              for p, g, m, v, c in zip(params, grads, exp_avgs, exp_avg_sqs, codes)]
    return torch.stack(counts)


def cpl_sgd_step_multi_(
    params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor] | None,
    codes: Sequence[Tensor | None] | None, lr, momentum: float = 0.0, dampening: float = 0.0,
    weight_decay: float = 0.0, nesterov: bool = False, init_buffer: bool = False,
    criterion: str = "update", strict: bool = True,
) -> Tensor:
    """cpl_sgd_step_ on every tensor; momentum_buffers is required (one per param) when
    momentum != 0 and ignored otherwise."""
    op = "cpl_sgd_step_multi_"
    params = _as_list("params", op, params, len(params) if isinstance(params, Sequence) else -1)
    n = len(params)
    grads = _as_list("grads", op, grads, n)
    codes = _as_list("codes", op, codes, n, optional=True)
    if momentum != 0:
        if momentum_buffers is None:
            raise ValueError(f"cpl.{op}: argument 'momentum_buffers' is required when momentum={momentum}")
        bufs = _as_list("momentum_buffers", op, momentum_buffers, n)
    else:
        bufs = [None] * n
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    device = params[0].device
    for p, g, b, c in zip(params, grads, bufs, codes):
        check.param_and_grad(op, p, g)
        check.tensor(op, "params", p, like=params[0])
        if b is not None:
            check.fp32_state(op, "momentum_buffers", b, p)
        if c is not None:
            check.codes(op, "codes", c, p.numel(), like=p)
    check.criterion(op, criterion, strict)
    check.hyper(op, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"cpl.{op}: argument 'nesterov' needs momentum > 0 and dampening == 0")
    if _native_multi(op, device):
        return torch.ops.cpl.cpl_sgd_step_multi_(
            params, grads, bufs if momentum != 0 else [], codes, _scalar_tensor(op, "lr", lr, device),
            float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(init_buffer),
            criterion, bool(strict))
    lr_f = _scalar_float(lr)
    check.hyper(op, lr=lr_f)
    counts = [ops.kernel("cpl_sgd_step_", p.device)(
                  p, g, b, c, lr_f, float(momentum), float(dampening), float(weight_decay),
                  bool(nesterov), bool(init_buffer), criterion, bool(strict))
              for p, g, b, c in zip(params, grads, bufs, codes)]
    return torch.stack(counts)


# ---- reference: the single-tensor reference in a loop (the oracle for the tests) ------------

def reference_adam_step_multi_(params, grads, exp_avgs, exp_avg_sqs, codes, step, lr, beta1, beta2,
                               eps, weight_decay, decoupled, criterion="update", strict=True) -> Tensor:
    codes = [None] * len(params) if codes is None else codes
    counts = [ref.cpl_adam_step_(p, g, m, v, c, _scalar_float(step), _scalar_float(lr), beta1, beta2,
                                 eps, weight_decay, decoupled, criterion, strict)
              for p, g, m, v, c in zip(params, grads, exp_avgs, exp_avg_sqs, codes)]
    return torch.stack(counts) if counts else torch.zeros(0, dtype=torch.int64)


def reference_sgd_step_multi_(params, grads, momentum_buffers, codes, lr, momentum=0.0, dampening=0.0,
                              weight_decay=0.0, nesterov=False, init_buffer=False, criterion="update",
                              strict=True) -> Tensor:
    codes = [None] * len(params) if codes is None else codes
    bufs = momentum_buffers if momentum != 0 else [None] * len(params)
    counts = [ref.cpl_sgd_step_(p, g, b, c, _scalar_float(lr), momentum, dampening, weight_decay,
                                nesterov, init_buffer, criterion, strict)
              for p, g, b, c in zip(params, grads, bufs, codes)]
    return torch.stack(counts) if counts else torch.zeros(0, dtype=torch.int64)
