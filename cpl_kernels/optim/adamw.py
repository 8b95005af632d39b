"""CPLAdamW: torch.optim.AdamW (decoupled weight decay) with the CPL rule."""
from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from .adam import CPLAdam


class CPLAdamW(CPLAdam):
    """AdamW with Collaborative Parameter Learning; see CPLAdam for the rule and the state.

    The update direction includes the decay, u = mhat/(sqrt(vhat)+eps) + weight_decay*p, so a
    frozen element is not decayed either (docs/design.md section 1). With no reference it is
    torch.optim.AdamW (default weight_decay=1e-2)."""

    DECOUPLED = True

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, criterion: str = "update", strict: bool = True,
                 check_finite: bool | str = "skip") -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, foreach=foreach, maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused, criterion=criterion,
                         strict=strict, check_finite=check_finite)
