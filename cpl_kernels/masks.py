"""Static masks for MaskedAdamW: CPL computed once from two gradients, and random ablations.

CPL masks are written as bits by the `cpl_mask_words` op (1 bit per element, plus one int64 of
block offsets per 1024 elements: 0.133 B/element), straight from the two gradients, or from one
gradient and the other's 2-bit sign codes: no bool or float temporary the size of a parameter.
A `PackedMask` is what MaskedAdamW keeps, so it takes one as it is. `mean_gradients` computes the
mean gradients over batches that the masks are built from.

    new = mean_gradients(model, injection_batches, loss_fn)
    ref = mean_gradients(model, mastered_batches, loss_fn)
    masks = cpl_masks_once(new, ref, packed=True)
    del new, ref
    opt = MaskedAdamW(model.named_parameters(), masks=masks)
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops
from . import reference as ref
from .reference_grad import LossFn, _accumulate, _Caller, _check_batches


@dataclass(frozen=True)
class PackedMask:
    """A parameter's mask as bits: element i (row-major order of `shape`) is active when bit
    i % 32 of words[i // 32] is set; block_offsets are MaskedAdamW's compact-state offsets
    (reference.mask_block_offsets) and `active` the number of set bits."""
    words: Tensor          # int32 [ceil(n / 32)]
    block_offsets: Tensor  # int64 [ceil(n / 1024)]
    active: int
    shape: torch.Size

    def numel(self) -> int:
        return self.shape.numel()

    def sum(self) -> int:
        """Active elements (as a bool mask's sum)."""
        return self.active

    def unpack(self) -> Tensor:
        """The bool mask (1 B per element). Words are read as little-endian bytes: 1 B per element
        of temporaries, where reference.unpack_mask's int64 fields take 8."""
        n = self.numel()
        byte = self.words.contiguous().view(torch.uint8)
        shifts = torch.arange(8, dtype=torch.uint8, device=byte.device)
        bits = (byte.unsqueeze(1) >> shifts).bitwise_and_(1)
        return bits.view(-1)[:n].bool().view(self.shape)

    @classmethod
    def from_bool(cls, mask: Tensor) -> PackedMask:
        """Packs a bool mask (row-major order)."""
        flat = mask.reshape(-1)
        words = ref.pack_mask(flat)
        return cls(words, ref.mask_block_offsets(words, flat.numel()), int(flat.sum()), mask.shape)

    @classmethod
    def full(cls, shape, device=None) -> PackedMask:
        """Every element active."""
        shape = torch.Size(shape)
        n = shape.numel()
        words = torch.full((ref.num_mask_words(n),), -1, dtype=torch.int32, device=device)
        if n % 32:
            words[-1] = (1 << (n % 32)) - 1
        offsets = torch.arange(ref.num_offset_blocks(n), dtype=torch.int64, device=device) * ref.OFFSET_BLOCK
        return cls(words, offsets, n, shape)


def _is_codes(r: Tensor, g: Tensor) -> bool:
    return r.dtype == torch.int32 and r.numel() == ref.num_code_words(g.numel()) and r.dim() <= 1


def cpl_mask(g_new: Tensor, reference: Tensor | None) -> PackedMask:
    """One parameter's CPL mask as bits: active (trained) where g_new * reference >= 0 on signs
    (ties, zeros and NaN collaborative, as the kernels decide). `reference` is the reference
    gradient (shaped like g_new), its 2-bit sign codes (an int32 tensor from ops.pack_signs_), or
    None (everything collaborative)."""
    if reference is None:
        return PackedMask.full(g_new.shape, g_new.device)
    a = g_new.contiguous()  # a copy only for a non-contiguous gradient
    if isinstance(reference, Tensor) and _is_codes(reference, g_new):
        b, codes = None, reference.contiguous()
    else:
        if not isinstance(reference, Tensor) or reference.shape != g_new.shape:
            shape = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference).__name__
            raise ValueError(f"cpl_masks_once: gradients of shapes {tuple(g_new.shape)} and {shape} differ "
                             "(a reference is a gradient of the same shape, or its sign codes)")
        b, codes = reference.to(a.dtype).contiguous(), None
    words = ops.empty_mask(a)
    offsets = torch.empty(ref.num_offset_blocks(a.numel()), dtype=torch.int64, device=a.device)
    active = ops.cpl_mask_words(a.view(-1), None if b is None else b.view(-1), codes, words, offsets)
    return PackedMask(words, offsets, int(active), g_new.shape)


def cpl_masks_once(grads_new, grads_ref, *, packed: bool = False):
    """The CPL mask computed once: True where g_new * g_ref >= 0 (collaborative, trained).

    grads_new, grads_ref: mappings (param or name -> tensor) with the same keys, or sequences of the
    same length. A reference entry may be a gradient or its sign codes (ops.pack_signs_), and a key
    whose reference is missing or None is all collaborative; a key whose new gradient is None gets
    no mask (MaskedAdamW then trains it fully). Returns the same kind of container as grads_new,
    holding PackedMask (packed=True: 0.133 B per element, built without temporaries) or bool
    tensors (packed=False: 1 B per element)."""
    def one(g: Tensor | None, r) -> PackedMask | Tensor | None:
        if g is None:
            return None
        mask = cpl_mask(g, r)
        return mask if packed else mask.unpack()

    if isinstance(grads_new, Mapping):
        if not isinstance(grads_ref, Mapping):
            raise TypeError("cpl_masks_once: grads_ref must be a mapping when grads_new is one")
        return {k: one(g, grads_ref.get(k)) for k, g in grads_new.items() if g is not None}
    if len(grads_new) != len(grads_ref):
        raise ValueError(f"cpl_masks_once: {len(grads_new)} new gradients but {len(grads_ref)} reference ones")
    return [one(g, r) for g, r in zip(grads_new, grads_ref)]


def random_masks_like(masks, seed: int = 0):
    """Random masks with exactly the same number of active elements per tensor as `masks` (the
    matched-sparsity ablation). Same container and mask kind (bool or PackedMask); deterministic
    for a given seed."""
    gen = torch.Generator().manual_seed(seed)

    def one(mask):
        packed = isinstance(mask, PackedMask)
        k = mask.active if packed else int(mask.sum())
        device = mask.words.device if packed else mask.device
        out = torch.zeros(mask.numel(), dtype=torch.bool)
        out[torch.randperm(mask.numel(), generator=gen)[:k]] = True
        out = out.view(mask.shape).to(device)
        return PackedMask.from_bool(out) if packed else out

    if isinstance(masks, Mapping):
        return {k: None if m is None else one(m) for k, m in masks.items()}
    return [None if m is None else one(m) for m in masks]


def mean_gradients(model: torch.nn.Module, batches: Iterable, loss_fn: LossFn, *,
                   progress: bool = False) -> dict[str, Tensor | None]:
    """The mean gradient of loss_fn(model, batch) over `batches`, per trainable parameter name
    (None for a parameter the loss does not reach): the inputs of cpl_masks_once.

    Gradients accumulate in the parameters' .grad (scaled by 1/len(batches) as they go when the
    count is known) and are handed over, not copied: the call holds one gradient per parameter at
    its peak, as a training step does. Gradients the parameters held before are put back. Uses
    the model's current mode (train/eval) and weights."""
    caller = _Caller("mean_gradients", "batches", "batch")
    _check_batches(batches, caller)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("mean_gradients: the model has no trainable parameter (requires_grad=True)")
    params = [p for _, p in named]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        _accumulate(model, batches, loss_fn, params, progress=progress, caller=caller)
        out = {}
        for name, p in named:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"mean_gradients: parameter {name!r} got a sparse gradient "
                                   "(e.g. Embedding(sparse=True)); masks need dense gradients")
            out[name] = p.grad
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return out
