"""CPL with a reference refreshed during training, and its random-mask ablation."""
from __future__ import annotations

import torch

import cpl_kernels

from .. import optimizers
from .base import Context, Method, loss_fn, trainable


class CPL(Method):
    """The paper's method on the library's CPL optimizer.

    reference="epoch": the reference is the mean gradient over the whole mastered in-set, rebuilt
    at the start of every epoch (the paper's schedule). reference="step": rebuilt before every step
    from a fresh random batch of ref_batch in-set questions (the prototype's schedule), or every
    ref_every steps, keeping the last reference in between."""
    name = "cpl"

    def __init__(self, model, ctx: Context):
        super().__init__(model, ctx)
        self.opt = optimizers.cpl(trainable(model), ctx.lr, ctx.cfg)
        # --in-backward: the hooks pack the reference (build_reference) and step each parameter
        self.attached = cpl_kernels.in_backward(self.opt) if ctx.cfg.in_backward else None
        self.steps = 0

    def start_epoch(self, epoch):
        if self.ctx.cfg.reference == "epoch":
            batches = list(self.ctx.mastered_in.batches(self.ctx.cfg.ref_batch))
            cpl_kernels.build_reference(self.opt, self.model, batches, loss_fn, progress=False)

    def refresh_reference(self):
        """reference="step": a fresh mastered batch every ref_every steps (before this step)."""
        cfg = self.ctx.cfg
        if cfg.reference == "step" and self.steps % cfg.ref_every == 0:
            # Cheapest before the injection backward: build_reference has no gradient to set aside.
            cpl_kernels.build_reference(self.opt, self.model, [self.mastered_batch()], loss_fn,
                                        progress=False)
        self.steps += 1

    def step(self, batch):
        self.refresh_reference()
        loss = self.backward(batch)
        if self.attached is None:
            self.opt.step()
        self.record_frozen(self.opt.frozen_fraction)
        return loss


DEFAULT_RANDOM_FRACTION = 0.5  # when no CPL cell to match: the prototype froze about half per step


class RandomMask(Method):
    """Freezes a fresh random subset of elements every step, sized to match CPL's frozen fraction
    (of the same lr and seed, epoch by epoch) or --random-frac.

    Built on the same CPL optimizer so that only *which* elements freeze differs from CPL: the
    reference is set to -sign(g) on a random subset of the elements with g != 0 (and 0 elsewhere),
    so the CPL test freezes exactly that subset (criterion "gradient"; under "update" the test
    reads u, whose sign is g's for almost every element)."""
    name = "random"

    def __init__(self, model, ctx: Context):
        super().__init__(model, ctx)
        self.params = trainable(model)
        self.opt = optimizers.cpl(self.params, ctx.lr, ctx.cfg)
        self.target = DEFAULT_RANDOM_FRACTION

    def start_epoch(self, epoch):
        cfg, targets = self.ctx.cfg, self.ctx.frozen_target
        if cfg.random_frac is not None:
            self.target = cfg.random_frac
        elif targets:
            self.target = targets.get(epoch, targets[max(targets)])

    @torch.no_grad()
    def _random_reference(self, grads):
        total = sum(g.numel() for g in grads)
        nonzero = sum(int(torch.count_nonzero(g)) for g in grads)
        # Frozen fraction is counted over all elements; only elements with g != 0 can freeze.
        p = min(1.0, self.target * total / max(nonzero, 1))
        gen = self.ctx.generator
        # Drawn on the CPU generator (reproducible on any device), then moved next to g.
        return [-torch.sign(g) * (torch.rand(g.shape, generator=gen) < p).to(g.device, g.dtype)
                for g in grads]

    def step(self, batch):
        loss = self.backward(batch)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.opt.set_reference_from_grads(self._random_reference(grads))
        self.opt.step()
        self.record_frozen(self.opt.frozen_fraction)
        return loss
