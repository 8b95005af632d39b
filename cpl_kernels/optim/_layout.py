"""Memory-order views, so that the kernels (which want one dense 1-D run of elements) can step any
parameter layout torch.optim steps: channels_last conv weights, transposed views, DTensor shards.

A parameter that is dense and non-overlapping (contiguous, channels_last, a transpose) is stepped
in place through a 1-D view of its storage in memory order; its gradient, optimizer state and
sign codes use the same memory order. A parameter with gaps (a strided slice) is stepped on a
contiguous copy that is written back.
"""
from __future__ import annotations

import torch
from torch import Tensor


def dense(t: Tensor) -> bool:
    """The elements of t fill one gap-free run of its storage (any order): its dims sorted by
    stride, each stride is the number of elements spanned by the dims below it."""
    if t.is_contiguous():
        return True
    span = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != span:
            return False
        span *= size
    return True


def same_layout(t: Tensor, like: Tensor) -> bool:
    """t's elements sit in memory in the order `like`'s working layout uses."""
    if dense(like):
        return t.is_contiguous() if like.is_contiguous() else t.stride() == like.stride()
    return t.is_contiguous()


def new_like(like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Zeros shaped like `like`, in its working layout (torch's preserve_format: the strides of a
    dense tensor, contiguous otherwise), as torch.optim allocates its state."""
    return torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)


def relaid(t: Tensor, like: Tensor) -> Tensor:
    """t itself when it already has `like`'s working layout, else a copy that has it."""
    if same_layout(t, like):
        return t
    out = torch.empty_like(like, dtype=t.dtype, memory_format=torch.preserve_format)
    out.copy_(t)
    return out


def flat(t: Tensor) -> Tensor:
    """A 1-D view of a dense tensor's elements in memory order."""
    if t.is_contiguous():
        return t.view(-1)
    if not dense(t):
        raise ValueError(f"flat: tensor of shape {tuple(t.shape)}, stride {t.stride()} has gaps")
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def flat_in_layout_of(t: Tensor, like: Tensor) -> Tensor:
    """t's elements as a 1-D tensor in `like`'s working memory order (a view when possible)."""
    return flat(relaid(t, like))


def working(t: Tensor, work: Tensor) -> Tensor:
    """State t (in its parameter's working layout) as the kernels take it beside the parameter's
    working tensor `work`: t itself when `work` is the contiguous parameter (same shape), else
    its 1-D view in memory order."""
    return t if work.dim() != 1 or t.dim() == 1 else flat(t)
