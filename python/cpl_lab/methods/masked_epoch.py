"""CPL as a mask refreshed once per epoch: MaskedAdamW (state only for the trained elements) whose
mask is recomputed at the start of every epoch from the mean injection gradient and the mean
mastered in-set gradient at the current weights, and applied with update_masks (elements that stay
trained keep their m and v)."""
from __future__ import annotations

import cpl_kernels

from .. import optimizers
from .base import Context, Method, trainable
from .static import mean_grads


class CPLMaskedEpoch(Method):
    name = "cpl-masked-epoch"

    def __init__(self, model, ctx: Context):
        super().__init__(model, ctx)
        self.params = trainable(model)
        self.opt = optimizers.masked(self.params, self.masks(), ctx.lr, ctx.cfg)
        self.fresh = True  # the masks were just computed at these weights

    def masks(self):
        bs = self.ctx.cfg.ref_batch
        masks = cpl_kernels.cpl_masks_once(mean_grads(self.model, self.params, self.ctx.inject, bs),
                                           mean_grads(self.model, self.params, self.ctx.mastered_in, bs))
        self.fraction = 1.0 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
        return masks

    def start_epoch(self, epoch: int) -> None:
        if self.fresh:  # epoch 1: the weights have not moved since the constructor's masks
            self.fresh = False
            return
        self.opt.update_masks(self.masks())

    def step(self, batch):
        loss = self.backward(batch)
        self.opt.step()
        self.record_frozen(self.fraction)
        return loss
