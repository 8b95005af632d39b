"""CPLSGD: torch.optim.SGD (momentum, dampening, nesterov, L2 weight decay) with the CPL rule."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .. import multi_tensor
from . import _layout
from ._base import Item, check_args, check_hyper, like_param, local, lr_value
from ._cpl import CODES_KEY, CPLOptimizer, check_criterion


class CPLSGD(CPLOptimizer):
    """SGD with Collaborative Parameter Learning (docs/design.md section 1).

    u = g (plain) or the momentum buffer (nesterov: g + momentum*buf); the CPL rule and the two
    criteria are as in CPLAdam (for plain SGD both criteria coincide). With no reference it is
    torch.optim.SGD. State: 'momentum_buffer' (fp32, laid out like the parameter, only when
    momentum != 0, set to the first gradient on the first step as torch does) and the codes
    while a reference is set."""

    FLOAT_STATE = ("momentum_buffer",)

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, differentiable: bool = False,
                 fused: bool | None = None, criterion: str = "update", strict: bool = True,
                 check_finite: bool = True) -> None:
        owner = type(self).__name__
        check_args(owner, maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused)
        check_hyper(owner, lr, weight_decay=weight_decay, momentum=momentum)
        check_criterion(owner, criterion, strict)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"{owner}: Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=False, foreach=foreach, differentiable=False,
                        fused=fused, criterion=criterion, strict=strict, check_finite=check_finite)
        super().__init__(params, defaults)

    def _plan_group(self, group, items: list[Item]):
        owner = type(self).__name__
        lr = lr_value(owner, group["lr"])
        momentum = group["momentum"]
        check_hyper(owner, lr, weight_decay=group["weight_decay"], momentum=momentum)
        check_criterion(owner, group["criterion"], group["strict"])
        if group["nesterov"] and (momentum <= 0 or group["dampening"] != 0):
            raise ValueError(f"{owner}: Nesterov momentum requires a momentum and zero dampening")
        installs: list[tuple[Tensor, object]] = []
        buckets: dict[bool, list] = {}  # first step (buffer = gradient) or not: one call each
        for it in items:
            state = self.state.get(it.param, {})
            buf, init = None, False
            if momentum != 0:
                value = state.get("momentum_buffer")
                if value is None:
                    init = True  # stored only when the step runs, like torch's lazy buffer
                    value = like_param(it.param, _layout.new_like(it.local))
                    installs.append((it.param, value))
                elif local(value).shape != it.local.shape or local(value).dtype != torch.float32:
                    raise ValueError(f"{owner}.step: 'momentum_buffer' of parameter "
                                     f"{self.param_name(it.param)} has shape {tuple(local(value).shape)} "
                                     f"and dtype {local(value).dtype}; expected fp32 of shape "
                                     f"{tuple(it.local.shape)}")
                elif not _layout.same_layout(local(value), it.local):
                    value = like_param(it.param, _layout.relaid(local(value), it.local))
                    installs.append((it.param, value))
                buf = _layout.flat(local(value))
            buckets.setdefault(init, []).append((it, buf, state.get(CODES_KEY)))

        def run() -> None:
            for p, value in installs:
                self.state[p]["momentum_buffer"] = value
            counts = []
            for init, bucket in buckets.items():
                counts.append(multi_tensor.cpl_sgd_step_multi_(
                    [it.work_param for it, _, _ in bucket], [it.work_grad for it, _, _ in bucket],
                    [buf for _, buf, _ in bucket] if momentum != 0 else None,
                    [c for _, _, c in bucket], lr, momentum, group["dampening"],
                    group["weight_decay"], group["nesterov"], init, group["criterion"],
                    group["strict"]).sum())
            self._record(counts, sum(it.local.numel() for it in items))

        return run
