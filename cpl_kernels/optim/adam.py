"""CPLAdam: torch.optim.Adam (L2 weight decay added to the gradient) with the CPL rule."""
from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from ._options import check_args, check_hyper, finite_mode
from ._cpl import CPLOptimizer, check_criterion

STATE_KEYS = ("exp_avg", "exp_avg_sq")


class CPLAdam(CPLOptimizer):
    """Adam with Collaborative Parameter Learning (docs/design.md section 1).

    With no reference set (or after clear_reference()) it is torch.optim.Adam: same arguments,
    defaults, state keys and results. With a reference (set_reference_from_grads), each element's
    update is applied only where it collaborates with the reference gradient:
      criterion="update" (the paper's rule): m, v see the raw gradient; u is applied where u*r >= 0.
      criterion="gradient": conflicting gradient elements (g*r < 0) are zeroed before m, v see them;
        strict=True applies u only where g passed, strict=False applies it everywhere.
    State per parameter: 'step' (fp32 0-dim, CPU), 'exp_avg', 'exp_avg_sq' (fp32 whatever the
    param dtype, laid out like the parameter), and the codes (0.25 B/element) while a reference
    is set. Parameters: float32, bfloat16 or float16, any layout.

    Non-finite gradients (check_finite, docs/optimizers.md): "skip" (default, fused into the
    step: those elements are left untouched and the parameters named in a warning), "raise"
    (a pre-pass; FloatingPointError, nothing written), False (torch's behaviour).
    GradScaler: gradients are unscaled inside the step and an inf/NaN step is skipped whole.
    """

    DECOUPLED = False
    FLOAT_STATE = STATE_KEYS
    COUNTS_STEPS = True

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, criterion: str = "update", strict: bool = True,
                 check_finite: bool | str = "skip") -> None:
        owner = type(self).__name__
        finite_mode(owner, check_finite)
        check_args(owner, amsgrad=amsgrad, foreach=foreach, maximize=maximize, capturable=capturable,
                   differentiable=differentiable, fused=fused)
        check_hyper(owner, lr, eps=eps, betas=betas, weight_decay=weight_decay)
        check_criterion(owner, criterion, strict)
        # torch's group keys are kept (all off) so the checkpoint reads as torch's own.
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False,
                        maximize=False, foreach=foreach, capturable=False, differentiable=False,
                        fused=fused, decoupled_weight_decay=self.DECOUPLED, criterion=criterion,
                        strict=strict, check_finite=check_finite)
        super().__init__(params, defaults)

    def _check_group_kind(self, groups) -> None:
        for g in groups:
            if "alpha" in g and "alpha" not in self.KEEP_GROUP_KEYS:
                raise ValueError(f"{type(self).__name__}.load_state_dict: the checkpoint was saved by "
                                 "MoFOAdamW (its groups hold 'alpha'), whose update rule differs; load it "
                                 "into MoFOAdamW")
            saved = g.get("decoupled_weight_decay")
            if saved is not None and bool(saved) != self.DECOUPLED:
                want = "CPLAdamW (torch.optim.AdamW)" if saved else "CPLAdam (torch.optim.Adam)"
                raise ValueError(f"{type(self).__name__}.load_state_dict: the checkpoint was saved by an "
                                 f"optimizer with decoupled_weight_decay={bool(saved)}, whose weight decay "
                                 f"rule differs; load it into {want}")

    def _kind(self, group) -> str:
        return "adamw" if self.DECOUPLED else "adam"

    def _state_keys(self, group) -> tuple[str, ...]:
        return STATE_KEYS

    def _hyper(self, group, fresh: bool) -> list[float]:
        beta1, beta2 = group["betas"]
        return [beta1, beta2, group["eps"], group["weight_decay"]]

    def _check_group(self, owner: str, group, lr: float) -> None:
        check_hyper(owner, lr, eps=group["eps"], betas=group["betas"], weight_decay=group["weight_decay"])
