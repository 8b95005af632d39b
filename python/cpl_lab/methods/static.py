"""CPL computed once (a static mask from the gradients at the start) and its random ablation,
both on MaskedAdamW, which keeps optimizer state only for the trained elements."""
from __future__ import annotations

import torch

import cpl_kernels

from .. import optimizers
from .base import Context, Method, loss_fn, trainable


def mean_grads(model, params, enc, batch_size) -> list[torch.Tensor]:
    """Mean gradient of the loss over all rows of enc (batch means weighted by batch size)."""
    for p in params:
        p.grad = None
    n = len(enc)
    for batch in enc.batches(batch_size):
        (loss_fn(model, batch) * (len(batch) / n)).backward()
    out = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return out


class CPLOnce(Method):
    """Mask = collaborative elements of (mean injection gradient, mean mastered in-set gradient)
    at the pre-trained weights, fixed for the whole run."""
    name = "cpl-once"

    def __init__(self, model, ctx: Context):
        super().__init__(model, ctx)
        params = trainable(model)
        bs = ctx.cfg.ref_batch
        masks = cpl_kernels.cpl_masks_once(mean_grads(model, params, ctx.inject, bs),
                                           mean_grads(model, params, ctx.mastered_in, bs))
        masks = self.adjust(masks)
        self.fraction = 1.0 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
        self.opt = optimizers.masked(params, masks, ctx.lr, ctx.cfg)

    def adjust(self, masks):
        return masks

    def step(self, batch):
        loss = self.backward(batch)
        self.opt.step()
        self.record_frozen(self.fraction)
        return loss


class RandomOnce(CPLOnce):
    """A random static mask with exactly CPL-once's number of trained elements per tensor."""
    name = "random-once"

    def adjust(self, masks):
        return cpl_kernels.random_masks_like(masks, seed=self.ctx.seed)
