"""Building the mastered reference: the mean gradient over mastered batches, packed into the CPL
optimizer's 2-bit sign codes."""
from __future__ import annotations

from collections.abc import Sized

import torch


def build_reference(optimizer, model, mastered_batches, loss_fn, progress: bool = True) -> int:
    """Sets `optimizer`'s reference to the sign of the mean gradient of `loss_fn` over the batches.

    loss_fn(model, batch) -> scalar loss. mastered_batches: any iterable of batches; the whole
    mastered set for the paper's per-epoch schedule, or `[batch]` for a reference sampled each step.
    Uses the model's current mode (train/eval) and weights. Works through DDP (gradients are
    all-reduced, so every rank gets the same reference) and FSDP2 (each rank packs its shard).

    Gradients the parameters held before the call are set aside and put back afterwards, so it may
    be called at any point; it is cheapest before the injection backward (nothing to set aside).
    The mastered gradients themselves are freed. Returns the number of batches used."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    count = len(mastered_batches) if isinstance(mastered_batches, Sized) else None
    iterator = mastered_batches
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(mastered_batches, total=count, desc="CPL reference", leave=False)
    used = 0
    try:
        for batch in iterator:
            loss = loss_fn(model, batch)
            # Divide as we go when the count is known; otherwise scale once at the end.
            (loss / count if count else loss).backward()
            used += 1
        if used == 0:
            raise ValueError("build_reference: mastered_batches yielded no batch")
        if not count or used != count:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, (count or 1) / used)
        optimizer.set_reference_from_grads({p: p.grad for p in params})
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return used
