"""What every injection method shares: the context it trains in and the step protocol.

A method owns its optimizer and is driven by the lab's loop: start_epoch(e) once per epoch, then
step(batch) per injection batch. Every method gets the same batches in the same order (same seed)
and the same number of steps: "same budget" means same data, steps and learning rate; methods
that need mastered data (CPL, A-GEM, replay) draw it from the in-set half only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import LabConfig
from ..data import Encoded
from ..evaluate import batch_loss


@dataclass
class Context:
    cfg: LabConfig
    lr: float
    seed: int
    inject: Encoded        # injection training rows
    mastered_in: Encoded   # mastered in-set rows (the only mastered data a method may train on)
    generator: torch.Generator  # for every random draw of the method (reference/replay batches, masks)
    frozen_target: dict | None = None  # epoch -> frozen fraction to match (random mask ablation)


def loss_fn(model, batch: Encoded) -> torch.Tensor:
    """The loss every method trains on (and build_reference's loss_fn(model, batch))."""
    return batch_loss(model, batch)


class Method:
    name = ""

    def __init__(self, model: torch.nn.Module, ctx: Context):
        self.model = model
        self.ctx = ctx
        self.opt: torch.optim.Optimizer | None = None
        self._frozen: list[float] = []

    @property
    def eval_model(self) -> torch.nn.Module:
        """The module to evaluate (LoRA wraps the base model)."""
        return self.model

    def start_epoch(self, epoch: int) -> None:
        """Called before the first step of each epoch (1-based)."""

    def step(self, batch: Encoded) -> float:
        raise NotImplementedError

    def backward(self, batch: Encoded) -> float:
        """Fresh gradients of the injection loss on `batch`; returns the loss."""
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn(self.model, batch)
        loss.backward()
        return loss.item()

    def mastered_batch(self) -> Encoded:
        return self.ctx.mastered_in.sample(self.ctx.cfg.ref_batch, self.ctx.generator)

    def record_frozen(self, fraction: float) -> None:
        self._frozen.append(fraction)

    def take_frozen(self) -> float:
        """Mean frozen fraction of the steps since the last call (0 for methods that freeze none)."""
        out = sum(self._frozen) / len(self._frozen) if self._frozen else 0.0
        self._frozen = []
        return out

    def state_bytes(self) -> int:
        import cpl_kernels
        return cpl_kernels.state_bytes(self.opt) if self.opt is not None else 0


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
