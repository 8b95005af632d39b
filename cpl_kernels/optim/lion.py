"""CPLLion: Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") with the CPL
rule, through the step engine (kind "lion", cpl_kernels/kinds.py)."""
from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from ._options import check_args, check_hyper, finite_mode
from ._cpl import CPLOptimizer, check_criterion


class CPLLion(CPLOptimizer):
    """Lion with Collaborative Parameter Learning.

    u = sign(beta1*m + (1-beta1)*g) + weight_decay*p; p -= lr*u where the CPL rule lets it;
    m = beta2*m + (1-beta2)*g for every element. State per parameter: 'exp_avg' (m, fp32, laid
    out like the parameter) and the codes while a reference is set: 4.25 B/param. Lion's sign
    update has unit magnitude, so its lr is usually 3-10x smaller than AdamW's (the paper).
    criterion, strict, check_finite and GradScaler as in CPLAdam."""

    FLOAT_STATE = ("exp_avg",)

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, *,
                 criterion: str = "update", strict: bool = True,
                 check_finite: bool | str = "skip") -> None:
        owner = type(self).__name__
        check_args(owner)
        check_hyper(owner, lr, betas=betas, weight_decay=weight_decay)
        check_criterion(owner, criterion, strict)
        finite_mode(owner, check_finite)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, criterion=criterion,
                        strict=strict, check_finite=check_finite)
        super().__init__(params, defaults)

    def _kind(self, group) -> str:
        return "lion"

    def _state_keys(self, group) -> tuple[str, ...]:
        return ("exp_avg",)

    def _hyper(self, group, fresh: bool) -> list[float]:
        beta1, beta2 = group["betas"]
        return [beta1, beta2, group["weight_decay"]]

    def _check_group(self, owner: str, group, lr: float) -> None:
        check_hyper(owner, lr, betas=group["betas"], weight_decay=group["weight_decay"])

    def _plain_name(self) -> str:
        return "Lion"
