"""CPLSGD: torch.optim.SGD (momentum, dampening, nesterov, L2 weight decay) with the CPL rule."""
from __future__ import annotations

import torch

from .. import multi_tensor
from ._base import check_args, check_hyper, like_param, local
from ._cpl import CODES_KEY, CPLOptimizer, check_criterion


class CPLSGD(CPLOptimizer):
    """SGD with Collaborative Parameter Learning (DESIGN.md section 1).

    u = g (plain) or the momentum buffer (nesterov: g + momentum*buf); the CPL rule and the two
    criteria are as in CPLAdam (for plain SGD both criteria coincide). With no reference it is
    torch.optim.SGD. State: 'momentum_buffer' (fp32, only when momentum != 0, set to the first
    gradient on the first step as torch does) and the codes while a reference is set."""

    FLOAT_STATE = ("momentum_buffer",)

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False, fused=None,
                 criterion="update", strict=True, check_finite=True):
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

    def _step_group(self, group, items) -> None:
        momentum = group["momentum"]
        check_criterion(type(self).__name__, group["criterion"], group["strict"])
        buckets: dict[bool, list] = {}  # first step (buffer = gradient) or not: one call each
        for p, lp, lg in items:
            state = self.state[p] if momentum != 0 else self.state.get(p, {})
            buf, init = None, False
            if momentum != 0:
                buf = state.get("momentum_buffer")
                if buf is None:
                    init = True
                    buf = like_param(p, torch.zeros_like(lp, dtype=torch.float32,
                                                         memory_format=torch.contiguous_format))
            buckets.setdefault(init, []).append((p, lp, lg, buf, state))
        counts = []
        for init, bucket in buckets.items():
            counts.append(multi_tensor.cpl_sgd_step_multi_(
                [lp for _, lp, *_ in bucket], [lg for _, _, lg, *_ in bucket],
                [None if buf is None else local(buf) for *_, buf, _ in bucket] if momentum != 0 else None,
                [st.get(CODES_KEY) for *_, st in bucket], float(group["lr"]), momentum,
                group["dampening"], group["weight_decay"], group["nesterov"], init,
                group["criterion"], group["strict"]).sum())
            if init:  # stored only after the op accepted it, like torch's lazy buffer
                for p, _, _, buf, st in bucket:
                    st["momentum_buffer"] = buf
        self._record(counts, sum(lp.numel() for _, lp, _ in items))
