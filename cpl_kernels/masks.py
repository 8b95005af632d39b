"""Static masks for MaskedAdamW: CPL computed once from two gradients, and random ablations."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def _collaborative(a: Tensor, b: Tensor | None) -> Tensor:
    """a*b >= 0 decided on signs (ties, zeros and NaN collaborative, as the kernels decide)."""
    if b is None:
        return torch.ones_like(a, dtype=torch.bool)
    if a.shape != b.shape:
        raise ValueError(f"cpl_masks_once: gradients of shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    return ~(((a > 0) & (b < 0)) | ((a < 0) & (b > 0)))


def cpl_masks_once(grads_new, grads_ref):
    """The CPL mask computed once: True where g_new * g_ref >= 0 (collaborative, trained).

    grads_new, grads_ref: mappings (param or name -> tensor) with the same keys, or sequences of the
    same length. A key whose reference gradient is missing or None is all collaborative; a key whose
    new gradient is None gets no mask (MaskedAdamW then trains it fully). Returns the same kind of
    container as grads_new."""
    if isinstance(grads_new, Mapping):
        if not isinstance(grads_ref, Mapping):
            raise TypeError("cpl_masks_once: grads_ref must be a mapping when grads_new is one")
        return {k: _collaborative(g, grads_ref.get(k)) for k, g in grads_new.items() if g is not None}
    if len(grads_new) != len(grads_ref):
        raise ValueError(f"cpl_masks_once: {len(grads_new)} new gradients but {len(grads_ref)} reference ones")
    return [None if g is None else _collaborative(g, r) for g, r in zip(grads_new, grads_ref)]


def random_masks_like(masks, seed: int = 0):
    """Random masks with exactly the same number of True elements per tensor as `masks` (the
    matched-sparsity ablation). Same container kind; deterministic for a given seed."""
    gen = torch.Generator().manual_seed(seed)

    def one(mask: Tensor) -> Tensor:
        k = int(mask.sum())
        out = torch.zeros(mask.numel(), dtype=torch.bool)
        out[torch.randperm(mask.numel(), generator=gen)[:k]] = True
        return out.view(mask.shape).to(mask.device)

    if isinstance(masks, Mapping):
        return {k: None if m is None else one(m) for k, m in masks.items()}
    return [None if m is None else one(m) for m in masks]
