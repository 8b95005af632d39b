"""CPLSGD: torch.optim.SGD (momentum, dampening, nesterov, L2 weight decay) with the CPL rule."""
from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from ._options import check_args, check_hyper, finite_mode
from ._cpl import CPLOptimizer, check_criterion


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
                 check_finite: bool | str = "skip") -> None:
        owner = type(self).__name__
        finite_mode(owner, check_finite)
        check_args(owner, maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused)
        check_hyper(owner, lr, weight_decay=weight_decay, momentum=momentum)
        check_criterion(owner, criterion, strict)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"{owner}: Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=False, foreach=foreach, differentiable=False,
                        fused=fused, criterion=criterion, strict=strict, check_finite=check_finite)
        super().__init__(params, defaults)

    def _kind(self, group) -> str:
        return "sgd"

    def _state_keys(self, group) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _hyper(self, group, fresh: bool) -> list[float]:
        # fresh: the buffer was created this step, so it starts as the gradient (torch.optim.SGD)
        return [group["momentum"], group["dampening"], group["weight_decay"], float(group["nesterov"]),
                float(fresh)]

    def _check_group(self, owner: str, group, lr: float) -> None:
        check_hyper(owner, lr, weight_decay=group["weight_decay"], momentum=group["momentum"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{owner}: Nesterov momentum requires a momentum and zero dampening")
