"""CPLAdam: torch.optim.Adam (L2 weight decay added to the gradient) with the CPL rule."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .. import multi_tensor
from . import _layout
from ._base import Item, check_args, check_hyper, like_param, local, lr_value
from ._cpl import CODES_KEY, CPLOptimizer, check_criterion

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

    Non-finite gradients raise FloatingPointError before anything is written (check_finite=True).
    """

    DECOUPLED = False
    FLOAT_STATE = STATE_KEYS

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, criterion: str = "update", strict: bool = True,
                 check_finite: bool = True) -> None:
        owner = type(self).__name__
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
            saved = g.get("decoupled_weight_decay")
            if saved is not None and bool(saved) != self.DECOUPLED:
                want = "CPLAdamW (torch.optim.AdamW)" if saved else "CPLAdam (torch.optim.Adam)"
                raise ValueError(f"{type(self).__name__}.load_state_dict: the checkpoint was saved by an "
                                 f"optimizer with decoupled_weight_decay={bool(saved)}, whose weight decay "
                                 f"rule differs; load it into {want}")

    def _plan_group(self, group, items: list[Item]):
        owner = type(self).__name__
        beta1, beta2 = group["betas"]
        lr = lr_value(owner, group["lr"])
        check_hyper(owner, lr, eps=group["eps"], betas=(beta1, beta2), weight_decay=group["weight_decay"])
        check_criterion(owner, group["criterion"], group["strict"])
        installs: list[tuple[Tensor, str, object]] = []
        buckets: dict[float, list] = {}  # one multi-tensor call per distinct step count
        for it in items:
            state = self.state.get(it.param, {})
            step = self._step_value(it.param, state)
            moments = []
            for key in STATE_KEYS:
                value = state.get(key)
                if value is None:
                    value = like_param(it.param, _layout.new_like(it.local))
                    installs.append((it.param, key, value))
                elif local(value).shape != it.local.shape or local(value).dtype != torch.float32:
                    raise ValueError(f"{owner}.step: '{key}' of parameter {self.param_name(it.param)} has "
                                     f"shape {tuple(local(value).shape)} and dtype {local(value).dtype}; "
                                     f"expected fp32 of shape {tuple(it.local.shape)}")
                elif not _layout.same_layout(local(value), it.local):
                    value = like_param(it.param, _layout.relaid(local(value), it.local))
                    installs.append((it.param, key, value))
                moments.append(_layout.flat(local(value)))
            if "step" not in state:
                installs.append((it.param, "step", torch.tensor(0.0, dtype=torch.float32)))
            buckets.setdefault(step + 1, []).append((it, *moments, state.get(CODES_KEY)))

        def run() -> None:
            for p, key, value in installs:
                self.state[p][key] = value
            counts = []
            for step, bucket in buckets.items():
                counts.append(multi_tensor.cpl_adam_step_multi_(
                    [it.work_param for it, *_ in bucket], [it.work_grad for it, *_ in bucket],
                    [m for _, m, _, _ in bucket], [v for _, _, v, _ in bucket],
                    [c for *_, c in bucket], step, lr, beta1, beta2, group["eps"],
                    group["weight_decay"], self.DECOUPLED, group["criterion"], group["strict"]).sum())
                for it, *_ in bucket:
                    self.state[it.param]["step"] += 1
            self._record(counts, sum(it.local.numel() for it in items))

        return run
