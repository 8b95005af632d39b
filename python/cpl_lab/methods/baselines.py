"""Baselines on torch.optim: plain fine-tuning, replay and A-GEM."""
from __future__ import annotations

import torch

import cpl_kernels

from .. import optimizers
from ..evaluate import answer_logits, per_row_loss
from .base import Context, Method, loss_fn, trainable


class FineTune(Method):
    """Plain fine-tuning on the injection set.

    With --in-backward: torch's optimizer-in-backward pattern, one torch optimizer per parameter
    stepped by that parameter's post-accumulate-grad hook, which then frees the gradient. On the
    CPU torch.optim steps each parameter on its own anyway (no foreach), so the results are the
    same bit for bit (tests/test_lab_pipeline.py)."""
    name = "ft"

    def __init__(self, model, ctx: Context):
        super().__init__(model, ctx)
        params = trainable(model)
        self.per_param = None
        if ctx.cfg.in_backward and self.name == "ft":
            self.per_param = {p: optimizers.plain([p], ctx.lr, ctx.cfg) for p in params}
            for p in params:
                p.register_post_accumulate_grad_hook(self._step_in_backward)
        else:
            self.opt = optimizers.plain(params, ctx.lr, ctx.cfg)

    def _step_in_backward(self, p):
        self.per_param[p].step()
        p.grad = None

    def backward(self, batch):
        if self.per_param is None:
            return super().backward(batch)
        loss = loss_fn(self.model, batch)
        loss.backward()  # every parameter stepped by its hook
        return loss.item()

    def step(self, batch):
        loss = self.backward(batch)
        if self.per_param is None:
            self.opt.step()
        return loss

    def state_bytes(self):
        if self.per_param is None:
            return super().state_bytes()
        return sum(cpl_kernels.state_bytes(o) for o in self.per_param.values())


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
