"""MoFO (Chen et al., TMLR 2025), the data-free rival, and MoFO with CPL's reference."""
from __future__ import annotations

from .. import optimizers
from .base import Context, Method, trainable
from .cpl import CPL


class _MovedFraction:
    """The frozen fraction these methods report: elements the step left unchanged (the momentum
    filter's and CPL's together), counted by comparing the parameters before and after (a copy of
    the weights per step: 1.4 MB for the lab's model)."""

    def _step_and_count(self) -> None:
        params = trainable(self.model)
        before = [p.detach().clone() for p in params]
        self.opt.step()
        moved = sum(int((p.detach() != b).sum()) for p, b in zip(params, before))
        total = sum(p.numel() for p in params)
        self.record_frozen(1.0 - moved / total if total else 0.0)


class MoFO(_MovedFraction, Method):
    """MoFOAdamW (--mofo-alpha of each tensor, by |momentum|; norms and biases fully updated): no
    mastered data at all."""
    name = "mofo"

    def __init__(self, model, ctx: Context):
        super().__init__(model, ctx)
        self.opt = optimizers.mofo(model, ctx.lr, ctx.cfg)

    def step(self, batch):
        loss = self.backward(batch)
        self._step_and_count()
        return loss


class CPLMoFO(_MovedFraction, CPL):
    """MoFOAdamW with CPL's reference on the same schedule as `cpl` (--reference, --ref-batch,
    --ref-every, --criterion): an element moves iff its momentum is in its tensor's top
    --mofo-alpha and it does not conflict with the reference."""
    name = "cpl-mofo"

    def __init__(self, model, ctx: Context):
        Method.__init__(self, model, ctx)
        self.opt = optimizers.mofo(model, ctx.lr, ctx.cfg)
        self.attached = None  # not an --in-backward method (config.IN_BACKWARD_METHODS)
        self.steps = 0

    def step(self, batch):
        self.refresh_reference()  # CPL's schedule; start_epoch is CPL's too (reference="epoch")
        loss = self.backward(batch)
        self._step_and_count()
        return loss
