"""CPLAdam: torch.optim.Adam (L2 weight decay added to the gradient) with the CPL rule."""
from __future__ import annotations

import torch

from .. import multi_tensor
from ._base import check_args, check_hyper, like_param, local
from ._cpl import CODES_KEY, CPLOptimizer, check_criterion


class CPLAdam(CPLOptimizer):
    """Adam with Collaborative Parameter Learning (DESIGN.md section 1).

    With no reference set (or after clear_reference()) it is torch.optim.Adam: same arguments,
    defaults, state keys and results. With a reference (set_reference_from_grads), each element's
    update is applied only where it collaborates with the reference gradient:
      criterion="update" (the paper's rule): m, v see the raw gradient; u is applied where u*r >= 0.
      criterion="gradient": conflicting gradient elements (g*r < 0) are zeroed before m, v see them;
        strict=True applies u only where g passed, strict=False applies it everywhere.
    State per parameter: 'step' (fp32 0-dim, CPU), 'exp_avg', 'exp_avg_sq' (fp32 whatever the
    param dtype), and the codes (0.25 B/element) while a reference is set.

    Non-finite gradients raise FloatingPointError before anything is written (check_finite=True).
    """

    DECOUPLED = False
    FLOAT_STATE = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, criterion="update", strict=True, check_finite=True):
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

    def _step_group(self, group, items) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
        check_criterion(type(self).__name__, group["criterion"], group["strict"])
        buckets: dict[float, list] = {}  # one multi-tensor call per distinct step count
        for p, lp, lg in items:
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)  # on CPU: no device sync
                state["exp_avg"] = like_param(p, torch.zeros_like(lp, dtype=torch.float32,
                                                                  memory_format=torch.contiguous_format))
                state["exp_avg_sq"] = like_param(p, torch.zeros_like(lp, dtype=torch.float32,
                                                                     memory_format=torch.contiguous_format))
            buckets.setdefault(float(state["step"]) + 1, []).append((p, lp, lg, state))
        counts = []
        for step, bucket in buckets.items():
            counts.append(multi_tensor.cpl_adam_step_multi_(
                [lp for _, lp, _, _ in bucket], [lg for _, _, lg, _ in bucket],
                [local(st["exp_avg"]) for *_, st in bucket], [local(st["exp_avg_sq"]) for *_, st in bucket],
                [st.get(CODES_KEY) for *_, st in bucket], step, lr, beta1, beta2, eps, wd,
                self.DECOUPLED, group["criterion"], group["strict"]).sum())
            for *_, st in bucket:
                st["step"] += 1  # after the op: a rejected input leaves the count untouched
        self._record(counts, sum(lp.numel() for _, lp, _ in items))
