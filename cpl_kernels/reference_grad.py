"""Building the mastered reference: the mean gradient over mastered batches, packed into the CPL
optimizer's 2-bit sign codes."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Any, NamedTuple

import torch
from torch import Tensor

LossFn = Callable[[torch.nn.Module, Any], Tensor]


class _Caller(NamedTuple):
    """How errors name the public function and its batches (build_reference, mean_gradients)."""
    who: str = "build_reference"
    arg: str = "mastered_batches"
    batch: str = "mastered batch"


_BUILD_REFERENCE = _Caller()


def build_reference(optimizer, model: torch.nn.Module, mastered_batches: Iterable, loss_fn: LossFn, *,
                    progress: bool = False) -> int:
    """Sets `optimizer`'s reference to the sign of the mean gradient of `loss_fn` over the batches.

    loss_fn(model, batch) -> scalar loss. mastered_batches: an iterable of batches (a list, a
    DataLoader, a generator); the whole mastered set for the paper's per-epoch schedule, or `[batch]`
    for a reference sampled each step. Uses the model's current mode (train/eval) and weights. Works
    through DDP (gradients are all-reduced, so every rank gets the same reference) and FSDP2 (each
    rank packs its shard). progress=True shows a tqdm bar (off by default: the per-step recipe calls
    this every step).

    Gradients the parameters held before the call are set aside and put back afterwards, so it may
    be called at any point; it is cheapest before the injection backward (nothing to set aside).
    The mastered gradients themselves are freed. Returns the number of batches used.

    Every argument is checked before anything is written: on an error the optimizer's codes and the
    parameters' .grad are exactly as before the call.

    With the optimizer stepping inside backward (cpl_kernels.in_backward), the backward runs in its
    reference_pass(): one sized batch is packed by the hooks as each gradient completes (no full
    mastered gradient is ever held); several are accumulated and packed at the end. The result
    is the same."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    _check_optimizer(optimizer, named)
    _check_batches(mastered_batches)
    params = [p for _, p in named]
    attached = getattr(optimizer, "_cpl_in_backward", None)
    if attached is not None:  # steps in backward: the hooks pack (cpl_kernels.optim.in_backward)
        # One batch: each hook packs its sign and frees the gradient; several: summed, then packed.
        one = isinstance(mastered_batches, Sized) and len(mastered_batches) == 1
        with attached.reference_pass(accumulate=not one):
            used = _accumulate(model, mastered_batches, loss_fn, params, progress=progress)
            _check_dense(named)
        return used
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        used = _accumulate(model, mastered_batches, loss_fn, params, progress=progress)
        _check_dense(named)  # set_reference_from_grads would raise half-way, codes partly rewritten
        optimizer.set_reference_from_grads({p: p.grad for p in params})
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return used


def _accumulate(model: torch.nn.Module, batches: Iterable, loss_fn: LossFn, params: list[Tensor], *,
                progress: bool, caller: _Caller = _BUILD_REFERENCE) -> int:
    """Backward of the mean loss over `batches` into the (cleared) .grad of `params`."""
    count = len(batches) if isinstance(batches, Sized) else None
    used = 0
    with _progress_bar(batches, total=count, enabled=progress, desc=caller.who) as iterator:
        for batch in iterator:
            try:
                loss = _checked_loss(loss_fn(model, batch), batch, index=used, caller=caller)
                # Divide as we go when the count is known; otherwise scale once at the end.
                (loss / count if count else loss).backward()
            except Exception as error:
                _note_batch(error, batch, index=used, caller=caller)
                raise
            used += 1
    if used == 0:
        raise ValueError(f"{caller.who}: {caller.arg} yielded no batch (an empty list, or a "
                         "generator or iterator already consumed?)")
    if not count or used != count:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, (count or 1) / used)
    return used


def _progress_bar(batches: Iterable, *, total: int | None, enabled: bool, desc: str):
    """A tqdm over the batches, closed even when a batch raises; the batches themselves when off."""
    if not enabled:
        return contextlib.nullcontext(batches)
    from tqdm.auto import tqdm
    return tqdm(batches, total=total, desc="CPL reference" if desc == "build_reference" else desc, leave=False)


# ---- argument checks (all before anything is written) ------------------------------------------

def _check_optimizer(optimizer, named: list[tuple[str, Tensor]]) -> None:
    """A CPL optimizer holding every trainable parameter of the model. A parameter it lacks would
    get no reference (its mastered gradient has nowhere to go), and an optimizer built from another
    model's parameters would silently step as plain AdamW: refuse both."""
    if not hasattr(optimizer, "set_reference_from_grads"):
        raise TypeError("build_reference needs a CPL optimizer (CPLAdamW, CPLAdam, CPLSGD); got "
                        f"{type(optimizer).__name__}")
    if not named:
        raise ValueError("build_reference: the model has no trainable parameter (requires_grad=True)")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in named if id(p) not in held]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(
            f"build_reference: the optimizer lacks {len(missing)} of the model's {len(named)} trainable "
            f"parameters ({shown}); build it from this model's parameters (not a copy's, and after any "
            "wrapping that replaces them)")


def _check_batches(batches, caller: _Caller = _BUILD_REFERENCE) -> None:
    """An iterable of batches, not one batch: a dict, a tensor or an (inputs, targets) tuple would
    be iterated over its keys, rows or fields, each then fed to loss_fn as if it were a batch."""
    if isinstance(batches, Mapping):
        raise TypeError(f"{caller.who}: {caller.arg} must be an iterable of batches, got a "
                        f"{type(batches).__name__}: did you mean [batch]?")
    if isinstance(batches, Tensor):
        raise TypeError(f"{caller.who}: {caller.arg} must be an iterable of batches, got a "
                        f"Tensor {_describe(batches)}: did you mean [batch]?")
    if isinstance(batches, tuple) and batches and all(isinstance(b, Tensor) for b in batches):
        raise TypeError(
            f"{caller.who}: {caller.arg} must be an iterable of batches, got a tuple of "
            f"{len(batches)} tensors ({_describe(batches)}), which looks like one batch: did you mean "
            "[batch]? (several tensor batches: pass a list)")
    if not isinstance(batches, Iterable):
        raise TypeError(f"{caller.who}: {caller.arg} must be an iterable of batches (a list, a "
                        f"DataLoader), got {type(batches).__name__}")


def _checked_loss(loss, batch, *, index: int, caller: _Caller = _BUILD_REFERENCE) -> Tensor:
    where = f"({caller.batch} {index}: {_describe(batch)})"
    if loss is None:
        raise TypeError(f"{caller.who}: loss_fn returned None: does the batch carry labels? {where}")
    if not isinstance(loss, Tensor):
        raise TypeError(f"{caller.who}: loss_fn must return a scalar tensor, got "
                        f"{type(loss).__name__} {where}")
    if loss.numel() != 1:
        raise ValueError(f"{caller.who}: loss_fn must return a scalar loss, got a tensor of shape "
                         f"{tuple(loss.shape)}; reduce it (e.g. .mean()) {where}")
    if not loss.requires_grad:
        raise RuntimeError(f"{caller.who}: the loss does not require grad (computed under "
                           f"torch.no_grad() or inference_mode, or detached?) {where}")
    return loss


def _check_dense(named: list[tuple[str, Tensor]]) -> None:
    sparse = [name for name, p in named if p.grad is not None and p.grad.is_sparse]
    if sparse:
        raise RuntimeError(f"build_reference: parameter {sparse[0]!r} got a sparse mastered gradient "
                           "(e.g. Embedding(sparse=True)); CPL needs dense gradients")


# ---- describing batches without printing their values -------------------------------------------

def _describe(batch, depth: int = 0) -> str:
    """A batch's structure with tensors as dtype[shape]: errors name what was passed without
    dumping its values."""
    if isinstance(batch, Tensor):
        return f"{str(batch.dtype).removeprefix('torch.')}{list(batch.shape)}"
    if depth >= 2:
        return type(batch).__name__
    if isinstance(batch, Mapping):
        items = [f"{k!r}: {_describe(v, depth + 1)}" for k, v in list(batch.items())[:8]]
        more = ", ..." if len(batch) > 8 else ""
        return f"{type(batch).__name__} {{{', '.join(items)}{more}}}"
    if isinstance(batch, (list, tuple)):
        items = [_describe(v, depth + 1) for v in batch[:8]]
        more = ", ..." if len(batch) > 8 else ""
        return f"{type(batch).__name__} ({', '.join(items)}{more})"
    return type(batch).__name__


def _note_batch(error: Exception, batch, *, index: int, caller: _Caller = _BUILD_REFERENCE) -> None:
    """Says which batch an error from loss_fn or backward came from (Python 3.11+ notes)."""
    if not str(error).startswith(f"{caller.who}:") and hasattr(error, "add_note"):
        error.add_note(f"{caller.who}: raised on {caller.batch} {index}: {_describe(batch)}")
