"""Gradient surgery (PCGrad, Yu et al. 2020), per parameter tensor: when the injection gradient g_l
of a tensor conflicts with the gradient r_l of a random mastered in-set batch (g_l . r_l < 0), its
conflicting component is removed, g_l <- g_l - (g_l . r_l / r_l . r_l) r_l; tensors that do not
conflict keep their gradient. Only the injection gradient is stepped on (the mastered gradient only
decides the projection, as CPL's reference does).

Per tensor rather than whole-model: projecting the whole-model gradient once is exactly A-GEM
(`agem`), already in the grid. After surgery every tensor's g_l . r_l >= 0, hence so is the whole
dot product.
"""
from __future__ import annotations

import torch

from .baselines import FineTune
from .base import loss_fn, trainable


@torch.no_grad()
def project_conflicting(grads: list[torch.Tensor], refs: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """Per tensor, g minus its component along r when g.r < 0; returns (grads, tensors projected)."""
    out, projected = [], 0
    for g, r in zip(grads, refs):
        dot = (g.double() * r.double()).sum()
        if dot < 0:
            rr = (r.double() * r.double()).sum()
            if rr > 0:
                g = (g.double() - (dot / rr) * r.double()).to(g.dtype)
                projected += 1
        out.append(g)
    return out, projected


class Surgery(FineTune):
    name = "surgery"

    def __init__(self, model, ctx):
        super().__init__(model, ctx)
        self.projected: list[float] = []  # per step: fraction of tensors projected (diagnostics)

    def reference_grads(self) -> list[torch.Tensor]:
        params = trainable(self.model)
        self.opt.zero_grad(set_to_none=True)
        loss_fn(self.model, self.mastered_batch()).backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    def step(self, batch):
        params = trainable(self.model)
        refs = self.reference_grads()
        loss = self.backward(batch)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        new, projected = project_conflicting(grads, refs)
        for p, g in zip(params, new):
            p.grad = g
        self.projected.append(projected / max(len(params), 1))
        self.opt.step()
        return loss
