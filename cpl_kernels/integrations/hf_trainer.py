"""transformers Trainer integration: rebuild the CPL reference on the Trainer's schedule.

    opt = CPLAdamW(model.parameters(), lr=1e-4, criterion="gradient")
    trainer = Trainer(model, args, train_dataset=injection, optimizers=(opt, None),
                      callbacks=[CPLReferenceCallback(mastered_dataset, every_n_steps=1, sample_batches=1)])

Callbacks receive `model`, `optimizer` and `train_dataloader` as keyword arguments (transformers
passes Trainer.model, Trainer.optimizer wrapped by accelerate, unwrapped here, and the prepared
training DataLoader, whose collate_fn is the Trainer's data collator). on_step_begin runs before
the first micro-batch of each optimizer step, and on_epoch_begin before the first step of the
epoch, when the Trainer has already zeroed the gradients; the reference is therefore built before
the injection backward, as build_reference prefers.
"""
from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import torch
from transformers import TrainerCallback, default_data_collator
from transformers.trainer_callback import CallbackHandler

from ..reference_grad import build_reference

FROZEN_KEY = "cpl/frozen_fraction"
REFERENCE_SECONDS_KEY = "cpl/reference_s"


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


def default_loss(model, batch):
    """model(**batch).loss, the Hugging Face convention (the batch must carry labels)."""
    if not isinstance(batch, Mapping):
        raise TypeError("CPLReferenceCallback: batches are not dicts; pass loss_fn=(model, batch) -> loss")
    return model(**batch).loss


def _is_dataset(mastered) -> bool:
    return not isinstance(mastered, torch.utils.data.DataLoader) and (
        hasattr(mastered, "__getitem__") and hasattr(mastered, "__len__"))


def _collator_name(collate_fn) -> str:
    inner = getattr(collate_fn, "data_collator", collate_fn)  # Trainer's RemoveColumnsCollator wrapper
    return getattr(inner, "__name__", type(inner).__name__)


class _BuildTimer:
    """Seconds spent building references since the last read. On a GPU the build is queued
    asynchronously, so it is timed with CUDA events and read (one sync) only when logged."""

    def __init__(self):
        self._seconds = 0.0
        self._events: list[tuple[Any, Any]] = []

    @contextlib.contextmanager
    def measure(self, device: torch.device):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - began

    @property
    def pending(self) -> bool:
        return bool(self._events) or self._seconds > 0.0

    def pop(self) -> float:
        for start, end in self._events:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000.0
        seconds, self._seconds, self._events = self._seconds, 0.0, []
        return seconds


class CPLReferenceCallback(TrainerCallback):
    """Rebuilds the mastered reference at every epoch begin (the paper's schedule) or, with
    every_n_steps=N, before every N-th optimizer step (N=1: a reference per step). The recipe the
    lab recommends: CPLReferenceCallback(mastered, every_n_steps=1, sample_batches=1) with
    CPLAdamW(..., criterion="gradient").

    mastered: a dataset (anything with __len__ and __getitem__), batched here with `batch_size`
    and `collate_fn`, or a DataLoader (or any re-iterable of batches), used as it collates.
    collate_fn defaults to the Trainer's own data collator (taken from its training DataLoader at
    train begin), so mastered batches carry labels exactly when training batches do; outside a
    Trainer, transformers' default_data_collator.
    sample_batches=k: each rebuild uses a fresh random sample of k batches instead of the whole
    set: drawn without replacement from a dataset by a generator seeded with `seed` (default: the
    Trainer's data_seed or seed, so every rank draws the same sample), or the next k batches of a
    DataLoader (cycled; shuffle it for a random sample).
    loss_fn(model, batch) -> loss; default model(**batch).loss.
    Multi-process training: Trainer hands callbacks the unwrapped model, whose backward does not
    all-reduce, so give every rank the same mastered data (no DistributedSampler): same weights and
    same data give every rank the same reference.

    Logged with the Trainer's logs (so TensorBoard, W&B and log_history get them): FROZEN_KEY, the
    mean frozen fraction over the steps since the last log, and REFERENCE_SECONDS_KEY, the seconds
    spent building references since the last log. After training, `rebuilds` lists (global_step,
    epoch) of every rebuild, and `frozen_fractions` (track_frozen=True) the optimizer's frozen
    fraction after every step (one host sync per step on a GPU)."""

    def __init__(self, mastered, *, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
                 every_n_steps: int | None = None, sample_batches: int | None = None,
                 batch_size: int | None = None, collate_fn: Callable | None = None, seed: int | None = None,
                 progress: bool = False, track_frozen: bool = True):
        _check_count("every_n_steps", every_n_steps)
        _check_count("sample_batches", sample_batches)
        _check_count("batch_size", batch_size)
        self.mastered = mastered
        if not _is_dataset(mastered) and (batch_size is not None or collate_fn is not None):
            raise ValueError("CPLReferenceCallback: batch_size and collate_fn apply to a dataset; a "
                             "DataLoader batches and collates mastered data itself")
        self.batch_size = batch_size or 1
        self.collate_fn = collate_fn
        self.loss_fn = loss_fn or self._default_loss
        self.every_n_steps = every_n_steps
        self.sample_batches = sample_batches
        self.seed = seed
        self.progress = progress
        self.track_frozen = track_frozen
        self.rebuilds: list[tuple[int, float | None]] = []
        self.frozen_fractions: list[float] = []
        self._trainer_collate: Callable | None = None
        self._generator: torch.Generator | None = None
        self._cycle: Iterator | None = None
        self._timer = _BuildTimer()
        self._unlogged_fractions: list[float] = []
        self._unlogged_steps = 0

    # ---- mastered batches ----------------------------------------------------------------------

    def _collate(self) -> Callable:
        return self.collate_fn or self._trainer_collate or default_data_collator

    def _default_loss(self, model, batch):
        """default_loss, saying which collator made label-less batches."""
        loss = default_loss(model, batch)
        if loss is None:
            raise TypeError(
                f"CPLReferenceCallback: model(**batch).loss is None: the mastered batches (keys "
                f"{sorted(batch)}, collated by {_collator_name(self._collate())}) carry no labels; "
                "give the mastered examples labels, or pass collate_fn= or loss_fn=")
        return loss

    def _batches(self) -> Iterable:
        """The batches of one rebuild: the whole mastered set, or a fresh sample of them."""
        if not _is_dataset(self.mastered):
            return self.mastered if self.sample_batches is None else self._next_loader_batches()
        dataset = self.mastered
        if self.sample_batches is not None:
            wanted = min(len(dataset), self.sample_batches * self.batch_size)
            order = torch.randperm(len(dataset), generator=self._sampling_generator())
            dataset = torch.utils.data.Subset(dataset, order[:wanted].tolist())
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=False,
                                           collate_fn=self._collate())

    def _next_loader_batches(self) -> list:
        """The next sample_batches batches of a DataLoader, starting a new pass when it runs out."""
        out: list = []
        while len(out) < self.sample_batches:
            fresh = self._cycle is None
            if fresh:
                self._cycle = iter(self.mastered)
            got = list(islice(self._cycle, self.sample_batches - len(out)))
            out += got
            if len(out) < self.sample_batches:
                self._cycle = None
                if fresh and not got:
                    break  # even a new pass is empty (a spent iterator): build_reference says so
        return out

    def _sampling_generator(self, args=None) -> torch.Generator:
        if self._generator is None:
            seed = self.seed
            if seed is None and args is not None:
                seed = args.data_seed if args.data_seed is not None else args.seed
            self._generator = torch.Generator().manual_seed(0 if seed is None else seed)
        return self._generator

    # ---- rebuilding ----------------------------------------------------------------------------

    def rebuild(self, model, optimizer, state=None) -> None:
        opt = _unwrap(optimizer)
        device = next(model.parameters()).device

        def loss(m, batch):
            return self.loss_fn(m, _to_device(batch, device))

        with self._timer.measure(device):
            build_reference(opt, model, self._batches(), loss, progress=self.progress)
        self.rebuilds.append((state.global_step if state else -1, state.epoch if state else None))

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        # The training DataLoader collates with the Trainer's data collator (wrapped to drop
        # columns the model does not take): mastered batches then look like training batches.
        self._trainer_collate = getattr(train_dataloader, "collate_fn", None)
        self._sampling_generator(args)
        self._run_before_reporters()

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.every_n_steps is None:
            self.rebuild(model, optimizer, state)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            self.rebuild(model, optimizer, state)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self._unlogged_steps += 1
        if self.track_frozen and optimizer is not None:
            fraction = _unwrap(optimizer).frozen_fraction
            self.frozen_fractions.append(fraction)
            self._unlogged_fractions.append(fraction)

    # ---- logging -------------------------------------------------------------------------------

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None or not (self._unlogged_steps or self._timer.pending):
            return  # nothing since the last log (e.g. the end-of-training summary)
        metrics = {REFERENCE_SECONDS_KEY: self._timer.pop()}
        if self._unlogged_fractions:
            metrics[FROZEN_KEY] = sum(self._unlogged_fractions) / len(self._unlogged_fractions)
        elif optimizer is not None and self._unlogged_steps:
            metrics[FROZEN_KEY] = _unwrap(optimizer).frozen_fraction  # track_frozen=False: last step
        self._unlogged_fractions, self._unlogged_steps = [], 0
        logs.update(metrics)
        # Trainer.log appended a copy of `logs` to log_history before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def _run_before_reporters(self) -> None:
        """Trainer puts user callbacks after its reporters (TensorBoard, W&B, ...), which read
        `logs` in their on_log before ours could add to it, and callbacks get no handle on the
        Trainer. The CallbackHandler running this event is the calling frame's `self`: put this
        callback first in its list (a new list: the handler is iterating over the old one)."""
        frame = inspect.currentframe()
        try:
            for _ in range(4):
                frame = frame.f_back if frame is not None else None
                handler = frame.f_locals.get("self") if frame is not None else None
                if isinstance(handler, CallbackHandler) and any(cb is self for cb in handler.callbacks):
                    handler.callbacks = [self] + [cb for cb in handler.callbacks if cb is not self]
                    return
        finally:
            del frame
        warnings.warn("CPLReferenceCallback: could not run before the Trainer's reporters; "
                      f"{FROZEN_KEY} and {REFERENCE_SECONDS_KEY} reach log_history but not TensorBoard/W&B",
                      stacklevel=2)


def _check_count(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"CPLReferenceCallback: {name} must be an integer >= 1, got {value!r}")
