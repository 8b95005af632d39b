"""EWC (Kirkpatrick et al. 2017): fine-tuning plus a quadratic pull towards the pre-trained weights,
weighted per element by the diagonal of the empirical Fisher information of the mastered in-set.

    F_i = mean over in-set rows x of (d loss(x) / d theta_i)^2      (computed once, at the start)
    penalty = lambda / 2 * sum_i F_i (theta_i - theta*_i)^2,  its gradient lambda F (theta - theta*)

The loss of a row is the training loss (mean cross-entropy of its answer tokens), one backward per
row: the Fisher needs per-example gradients (a batch gradient squared is not their mean square).
lambda is --ewc-lambda. The gradient is added to the injection gradient analytically (no second
graph); tests check it against autograd of penalty().
"""
from __future__ import annotations

import torch

from .. import optimizers
from ..data import Encoded
from .base import Context, Method, loss_fn, trainable


def diagonal_fisher(model, params, enc: Encoded) -> list[torch.Tensor]:
    """Mean over the rows of enc of the squared gradient of each row's loss, per element."""
    fisher = [torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    for i in range(len(enc)):
        loss_fn(model, enc.rows([i])).backward()
        for f, p in zip(fisher, params):
            if p.grad is not None:
                f.add_(p.grad.detach().square())
                p.grad = None
    n = max(len(enc), 1)
    return [f / n for f in fisher]


class EWC(Method):
    name = "ewc"

    def __init__(self, model, ctx: Context):
        super().__init__(model, ctx)
        self.params = trainable(model)
        self.lam = ctx.cfg.ewc_lambda
        self.anchor = [p.detach().clone() for p in self.params]
        self.fisher = diagonal_fisher(model, self.params, ctx.mastered_in)
        self.opt = optimizers.plain(self.params, ctx.lr, ctx.cfg)

    def penalty(self) -> torch.Tensor:
        """lambda/2 sum F (theta - theta*)^2, differentiable (for checks; training uses
        add_penalty_grad)."""
        return 0.5 * self.lam * sum((f * (p - a).square()).sum()
                                    for p, f, a in zip(self.params, self.fisher, self.anchor))

    @torch.no_grad()
    def add_penalty_grad(self) -> None:
        """p.grad += lambda F (theta - theta*), the gradient of penalty()."""
        for p, f, a in zip(self.params, self.fisher, self.anchor):
            g = self.lam * f * (p - a)
            p.grad = g if p.grad is None else p.grad.add_(g)

    def step(self, batch):
        loss = self.backward(batch)
        self.add_penalty_grad()
        self.opt.step()
        return loss

    def state_bytes(self) -> int:
        # The Fisher and the anchor are state the method keeps next to the optimizer's.
        extra = sum(t.numel() * t.element_size() for t in self.fisher + self.anchor)
        return super().state_bytes() + extra
