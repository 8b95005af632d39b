"""MaskedAdamW's compact state: masks turned into packed words (any layout, DTensor shards), and the
migration of m and v from one mask to another (MaskedAdamW.update_masks).

Everything works chunk by chunk (CHUNK elements at a time, a multiple of the 1024-element offset
block), so the temporaries are bounded by the chunk, not by the parameter: a 7B-element tensor's
mask is never unpacked to 7 GB of bools.
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

from .. import reference as ref
from ..masks import PackedMask
from . import _layout
from ._base import local

MASK_KEY, OFFSETS_KEY = "mask_words", "block_offsets"
# Elements per chunk: 1M bools + the kept indices stay under ~20 MB of temporaries.
CHUNK = 1 << 20
# Bit i of word w is element 32*w + i, so on a little-endian machine bit j of byte b is element
# 8*b + j: both directions below work on bytes (8 elements at a time), not on single bits.
_LITTLE = sys.byteorder == "little"
_BYTE_BITS: dict[torch.device, Tensor] = {}
# Packing 8 bool bytes (each 0 or 1) of an int64: the product puts bit j of the result at bit
# 56 + j (bytes 8j + 56 - 7j), with no other term reaching bits 56-63.
_GATHER_BITS = 0x0102040810204080


def _byte_bits(device: torch.device) -> Tensor:
    """[256, 8] bools: the bits of every byte value, lowest first."""
    if device not in _BYTE_BITS:
        _BYTE_BITS[device] = ((torch.arange(256, device=device).view(-1, 1) >> torch.arange(8, device=device))
                              & 1).bool()
    return _BYTE_BITS[device]


def unpack_chunk(words: Tensor, count: int) -> Tensor:
    """The first `count` bits of int32 `words` as bools: one table row per byte (measured on 16M
    elements, one thread: 89 ms, vs 850 ms for shifting every bit out of an int32)."""
    if not _LITTLE:
        return ref.unpack_mask(words, count)
    index = words.contiguous().view(torch.uint8).to(torch.int64)
    return _byte_bits(words.device).index_select(0, index).view(-1)[:count]


def pack_bool(mask_flat: Tensor) -> Tensor:
    """Packed words of a 1-D bool mask, CHUNK elements at a time, 8 bools per int64 multiply
    (16M elements: 63 ms, vs 800 ms for reference.pack_mask's int64 shifts)."""
    n = mask_flat.numel()
    words = torch.zeros(ref.num_mask_words(n), dtype=torch.int32, device=mask_flat.device)
    if not _LITTLE:
        words.copy_(ref.pack_mask(mask_flat)) if n else None
        return words
    buf = torch.zeros(min(CHUNK, ref.num_mask_words(n) * ref.BITS_PER_WORD), dtype=torch.uint8,
                      device=mask_flat.device)
    for start in range(0, n, CHUNK):
        end = min(start + CHUNK, n)
        size = ref.num_mask_words(end - start) * ref.BITS_PER_WORD
        chunk = buf[:size]
        chunk[: end - start].copy_(mask_flat[start:end])
        chunk[end - start:] = 0
        packed = (chunk.view(torch.int64) * _GATHER_BITS).bitwise_right_shift_(56).to(torch.uint8)
        words[start // ref.BITS_PER_WORD: ref.num_mask_words(end)] = packed.view(torch.int32)
    return words


def full_words(numel: int, active: bool, device) -> Tensor:
    """Words of an all-active (or all-frozen) mask of `numel` elements, no bit set past numel."""
    words = torch.full((ref.num_mask_words(numel),), -1 if active else 0, dtype=torch.int32, device=device)
    tail = numel % ref.BITS_PER_WORD
    if active and tail:
        words[-1] = (1 << tail) - 1
    return words


def local_mask(owner: str, name: str, p: Tensor, mask) -> Tensor:
    """The part of `mask` that belongs to this process's shard of p, as packed words in p's memory
    order (validated; nothing written).

    mask: a bool tensor shaped like p (for a DTensor p: a DTensor placed like p, whose local shard
    is taken, or a plain full-size tensor, from which this rank's shard is cut without any
    communication), or int32 words already packed in the memory order of p's local shard
    (reference.pack_mask's layout, reference.num_mask_words(local numel) of them), or a
    cpl_kernels.masks.PackedMask of p's full shape."""
    p_local = local(p)
    n = p_local.numel()
    is_dtensor = hasattr(p, "to_local")
    if isinstance(mask, PackedMask):
        if tuple(mask.shape) != tuple(p.shape):
            raise ValueError(f"{owner}: the mask for parameter {name} has shape {tuple(mask.shape)} but the "
                             f"parameter has shape {tuple(p.shape)}")
        # Its words are in row-major order: taken as they are when that is p's memory order, else
        # unpacked once and repacked in p's order (or cut to this rank's shard).
        mask = mask.words if not is_dtensor and _layout.dense(p) and p.is_contiguous() else mask.unpack()
    if not isinstance(mask, Tensor):
        raise TypeError(f"{owner}: the mask for parameter {name} must be a bool tensor or int32 packed "
                        f"words, got {type(mask).__name__}")
    if mask.dtype == torch.int32:
        words = local(mask).reshape(-1)
        if words.numel() != ref.num_mask_words(n):
            raise ValueError(f"{owner}: the packed mask for parameter {name} has {words.numel()} int32 "
                             f"words; its {'local shard' if is_dtensor else 'tensor'} of {n} elements "
                             f"needs {ref.num_mask_words(n)}")
        tail = n % ref.BITS_PER_WORD
        if tail and int(words[-1].item()) & ~((1 << tail) - 1) & 0xFFFFFFFF:
            raise ValueError(f"{owner}: the packed mask for parameter {name} has bits set past its "
                             f"{n} elements")
        return words.to(p_local.device).contiguous().clone()
    if mask.dtype != torch.bool:
        raise TypeError(f"{owner}: the mask for parameter {name} must be a bool tensor (or int32 packed "
                        f"words), got {mask.dtype}")
    if tuple(mask.shape) != tuple(p.shape):
        raise ValueError(f"{owner}: the mask for parameter {name} has shape {tuple(mask.shape)} but the "
                         f"parameter has shape {tuple(p.shape)}")
    if hasattr(mask, "to_local"):
        if not is_dtensor:
            raise TypeError(f"{owner}: the mask for parameter {name} is a DTensor but the parameter is not")
        if mask.device_mesh != p.device_mesh or tuple(mask.placements) != tuple(p.placements):
            raise ValueError(f"{owner}: the DTensor mask for parameter {name} is placed as "
                             f"{tuple(mask.placements)} on {mask.device_mesh}, the parameter as "
                             f"{tuple(p.placements)} on {p.device_mesh}; give it the parameter's "
                             "placement, or pass the full mask as a plain tensor")
        shard = mask.to_local()
    elif is_dtensor:
        from torch.distributed.tensor import distribute_tensor
        # src_data_rank=None: every rank cuts its own shard from its own full copy, no collective.
        shard = distribute_tensor(mask.to(p_local.device), p.device_mesh, p.placements,
                                  src_data_rank=None).to_local()
    else:
        shard = mask
    return pack_bool(_layout.flat_in_layout_of(shard.to(p_local.device), p_local))


def state_from_words(words: Tensor, numel: int) -> dict:
    """Fresh compact state for a packed mask: m and v zero for every active element, step 0."""
    counts = ref.mask_block_counts(words, numel)
    k = int(counts.sum())
    return {
        "step": torch.tensor(0.0, dtype=torch.float32),
        "exp_avg": torch.zeros(k, dtype=torch.float32, device=words.device),
        "exp_avg_sq": torch.zeros(k, dtype=torch.float32, device=words.device),
        MASK_KEY: words,
        OFFSETS_KEY: (torch.cumsum(counts, 0) - counts).contiguous(),
    }


@torch.no_grad()
def migrate(state: dict, new_words: Tensor, numel: int) -> dict:
    """The compact state of `state` moved onto the mask `new_words`, returned as a new dict
    (`state` is not modified): elements active in both masks keep their m and v, newly active
    ones start at zero, dropped ones are not carried over; the step count is kept.

    One pass over the two masks, CHUNK elements at a time: unpack both chunks, mark the elements
    kept, and copy their m and v from their rank among the old chunk's active elements to their
    rank among the new chunk's (the two ranks list the kept elements in the same memory order).
    Cost: reads both masks' words (0.25 B/element), writes the new m and v (8 B per new active
    element), reads m and v of the kept ones; the per-chunk temporaries are ~3 B per element of
    the chunk plus 16 B per kept element of the chunk. Measured (benchmarks/mask_update.py) at a
    few torch fused AdamW steps per call: the boolean compactions (kept[old], kept[new]) are
    torch's scalar nonzero/masked_select paths, not bandwidth-bound; a native one-pass op would
    do it at about one step's traffic."""
    old_words, old_offsets = state[MASK_KEY], state[OFFSETS_KEY]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    counts = ref.mask_block_counts(new_words, numel)
    new_offsets = (torch.cumsum(counts, 0) - counts).contiguous()
    k_new = int(counts.sum())
    new_m = torch.zeros(k_new, dtype=m.dtype, device=m.device)
    new_v = torch.zeros(k_new, dtype=v.dtype, device=v.device)
    stride = CHUNK // ref.OFFSET_BLOCK
    # Compact start of every chunk, old and new: one host copy of n / CHUNK entries each.
    old_starts = old_offsets[::stride].tolist() + [m.numel()]
    new_starts = new_offsets[::stride].tolist() + [k_new]
    for c, start in enumerate(range(0, numel, CHUNK)):
        end = min(start + CHUNK, numel)
        w0, w1 = start // ref.BITS_PER_WORD, ref.num_mask_words(end)
        old_bits = unpack_chunk(old_words[w0:w1], end - start)
        new_bits = unpack_chunk(new_words[w0:w1], end - start)
        kept = old_bits & new_bits
        src = kept[old_bits].nonzero().view(-1)
        if src.numel() == 0:
            continue
        dst = kept[new_bits].nonzero().view(-1)
        src += old_starts[c]
        dst += new_starts[c]
        new_m.index_copy_(0, dst, m.index_select(0, src))
        new_v.index_copy_(0, dst, v.index_select(0, src))
    out = dict(state)
    out.update({"exp_avg": new_m, "exp_avg_sq": new_v, MASK_KEY: new_words, OFFSETS_KEY: new_offsets})
    return out
