"""Baselines on torch.optim: plain fine-tuning, replay and A-GEM."""
from __future__ import annotations

import torch

from .. import optimizers
from ..evaluate import answer_logits, per_row_loss
from .base import Context, Method, loss_fn, trainable


class FineTune(Method):
    """Plain fine-tuning on the injection set."""
    name = "ft"

    def __init__(self, model, ctx: Context):
        super().__init__(model, ctx)
        self.opt = optimizers.plain(trainable(model), ctx.lr, ctx.cfg)

    def step(self, batch):
        loss = self.backward(batch)
        self.opt.step()
        return loss


class Replay(FineTune):
    """Each injection batch is trained together with a random batch of mastered in-set questions
    (ref_batch rows): the same number of steps, twice the rows per step."""
    name = "replay"

    def step(self, batch):
        self.opt.zero_grad(set_to_none=True)
        mixed = batch.cat(self.mastered_batch())
        rows = per_row_loss(*answer_logits(self.model, mixed))
        rows.mean().backward()
        self.opt.step()
        # Reported loss: the injection rows only, comparable with the other methods.
        return rows[:len(batch)].mean().item()


class AGEM(FineTune):
    """A-GEM (Chaudhry et al. 2019): when the injection gradient g conflicts with the gradient r
    of a random mastered batch (g.r < 0), step along g - (g.r / r.r) r instead."""
    name = "agem"

    def step(self, batch):
        params = trainable(self.model)
        self.opt.zero_grad(set_to_none=True)
        loss_fn(self.model, self.mastered_batch()).backward()
        ref = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        loss = self.backward(batch)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        dot = sum((g * r).sum() for g, r in zip(grads, ref))
        if dot < 0:
            scale = dot / sum((r * r).sum() for r in ref).clamp(min=1e-30)
            for p, g, r in zip(params, grads, ref):
                p.grad = g - scale * r
        self.opt.step()
        return loss
