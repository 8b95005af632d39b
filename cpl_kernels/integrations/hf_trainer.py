"""transformers Trainer integration: rebuild the CPL reference on the Trainer's schedule.

    opt = CPLAdamW(model.parameters(), lr=1e-4)
    trainer = Trainer(model, args, train_dataset=injection, optimizers=(opt, None),
                      callbacks=[CPLReferenceCallback(mastered_dataset)])

Callbacks receive `model` and `optimizer` as keyword arguments (transformers passes
Trainer.model and Trainer.optimizer, the latter wrapped by accelerate; it is unwrapped here).
on_step_begin runs before the first micro-batch of each optimizer step, and on_epoch_begin before
the first step of the epoch, when the Trainer has already zeroed the gradients; the reference is
therefore built before the injection backward, as build_reference prefers.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import TrainerCallback, default_data_collator

from ..reference_grad import build_reference


def default_loss(model, batch):
    """model(**batch).loss, the Hugging Face convention (the batch must carry labels)."""
    if not isinstance(batch, Mapping):
        raise TypeError("CPLReferenceCallback: batches are not dicts; pass loss_fn=(model, batch) -> loss")
    return model(**batch).loss


def _to_device(batch, device):
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def _unwrap(optimizer):
    """accelerate's AcceleratedOptimizer (and similar wrappers) keep the real one in .optimizer."""
    while not hasattr(optimizer, "set_reference_from_grads") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not hasattr(optimizer, "set_reference_from_grads"):
        raise TypeError(f"CPLReferenceCallback needs a CPL optimizer (CPLAdamW, CPLAdam, CPLSGD) "
                        f"passed as Trainer(optimizers=(opt, None)); got {type(optimizer).__name__}")
    return optimizer


class CPLReferenceCallback(TrainerCallback):
    """Rebuilds the mastered reference at every epoch begin (the paper's schedule) or, with
    every_n_steps=N, before every N-th optimizer step (N=1: a reference per step).

    mastered: a DataLoader (or any re-iterable of batches), or a dataset (anything with __len__ and
    __getitem__), batched here with `batch_size` and `collate_fn` (default: transformers'
    default_data_collator). loss_fn(model, batch) -> loss; default model(**batch).loss.
    Multi-process training: Trainer hands callbacks the unwrapped model, whose backward does not
    all-reduce, so give every rank the whole mastered set (no DistributedSampler): same weights and
    same data give every rank the same reference.

    After training, `rebuilds` lists (global_step, epoch) of every rebuild, and
    `frozen_fractions` (track_frozen=True) the optimizer's frozen fraction after every step
    (one host sync per step on a GPU)."""

    def __init__(self, mastered, loss_fn=None, every_n_steps: int | None = None, batch_size: int = 1,
                 collate_fn=None, progress: bool = False, track_frozen: bool = True):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"CPLReferenceCallback: every_n_steps must be >= 1, got {every_n_steps}")
        if isinstance(mastered, torch.utils.data.DataLoader) or not (
                hasattr(mastered, "__getitem__") and hasattr(mastered, "__len__")):
            self.loader = mastered
        else:
            self.loader = torch.utils.data.DataLoader(mastered, batch_size=batch_size, shuffle=False,
                                                      collate_fn=collate_fn or default_data_collator)
        self.loss_fn = loss_fn or default_loss
        self.every_n_steps = every_n_steps
        self.progress = progress
        self.track_frozen = track_frozen
        self.rebuilds: list[tuple[int, float | None]] = []
        self.frozen_fractions: list[float] = []

    def rebuild(self, model, optimizer, state=None) -> None:
        opt = _unwrap(optimizer)
        device = next(model.parameters()).device

        def loss(m, batch):
            return self.loss_fn(m, _to_device(batch, device))

        build_reference(opt, model, self.loader, loss, progress=self.progress)
        self.rebuilds.append((state.global_step if state else -1, state.epoch if state else None))

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.every_n_steps is None:
            self.rebuild(model, optimizer, state)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            self.rebuild(model, optimizer, state)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.track_frozen and optimizer is not None:
            self.frozen_fractions.append(_unwrap(optimizer).frozen_fraction)
