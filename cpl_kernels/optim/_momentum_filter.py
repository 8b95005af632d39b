"""MoFO's per-tensor threshold: the |m_new| above which an element's update is applied, chosen so
that about the top-alpha fraction of the tensor passes (cpl_kernels/optim/mofo.py).

m_new is the momentum the step is about to write, `beta1*m + (1-beta1)*g` with g as the engine
sees it (unscaled by grad_scale, non-finite elements as 0, conflicting elements zeroed under
criterion "gradient": reference_step.py steps 1-4), computed here in the engine's rounding, so the
threshold is taken over exactly the values the engine compares it with.

Exact for tensors of at most SAMPLE elements: the k-th largest |m_new| with k = max(1,
floor(alpha*n)) (the authors' code: `topk(|m|, int(n*fraction)).min()`), and every element
>= it passes, so ties at the threshold all pass (at least k elements are updated, more only on
ties).

Larger tensors: the same quantile of a fixed sample of LINES whole 64-byte lines (16 fp32
elements each: SAMPLE elements), so the extra read is 64 KiB of m and as much of g per tensor,
whatever its size (AdamW moves 28 B per element), not a pass over the tensor. Whole lines rather
than SAMPLE scattered elements: the gathers took 0.04 ms instead of 0.8 ms per 4M tensor (cold,
one thread, loaded machine), which decides whether a 35-tensor model's step stays near AdamW's.
The price is statistical: the 16 elements of a line are neighbours in one row, so where |m|
scales by row the sample is worth between LINES and SAMPLE independent draws. The fraction
kept differs from alpha by the sampling error of a quantile, about sqrt(alpha*(1-alpha)/N) for
an effective N in [1024, 16384]: between 0.0028 and 0.011 at alpha = 0.15. kept_error_bound
(5 of the worst case, 0.057 at 0.15) is what tests/test_mofo.py asserts on normal, heavy-tailed,
column-scaled, row-scaled and 40%-zero-row tensors; the errors it measures are listed there.

The sampled lines are floor(frac(i*phi)*L), i < LINES, of the tensor's L whole lines, phi the
golden ratio (a Weyl sequence): spread evenly over the whole tensor (rows and columns of any row
length; a plain stride hits only some columns of a matrix whose row length shares its factors),
sorted (the gathers walk memory forwards), fixed per size (a resumed run picks the same
thresholds: nothing random to checkpoint), and cached per (size, device). The last n % 16
elements are never sampled.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..reference import _collaborative, _div, f32, unpack_signs

LINE = 16         # fp32 elements in a 64-byte cache line
LINES = 1024      # lines sampled per tensor
SAMPLE = LINE * LINES
_PHI = (math.sqrt(5.0) - 1.0) / 2.0
_LINE_IDS: dict[tuple[int, torch.device], Tensor] = {}


def kept_error_bound(alpha: float) -> float:
    """What tests/test_mofo.py holds the sampled threshold to: |kept fraction - alpha| at most 5
    standard deviations of a quantile of LINES independent draws (the worst case: every line's 16
    elements alike) plus one sample element."""
    return 5.0 * math.sqrt(alpha * (1.0 - alpha) / LINES) + 1.0 / SAMPLE


def sample_lines(n: int, device: torch.device) -> Tensor:
    """The int64 indices of the 16-element lines sampled in a tensor of n > SAMPLE elements."""
    key = (n, device)
    ids = _LINE_IDS.get(key)
    if ids is None:
        lines = n // LINE
        frac = torch.remainder(torch.arange(LINES, dtype=torch.float64) * _PHI, 1.0)
        ids = (frac * lines).floor().to(torch.int64).clamp_(0, lines - 1).sort().values.to(device)
        _LINE_IDS[key] = ids
    return ids


def _gather_lines(x: Tensor, ids: Tensor) -> Tensor:
    return x[: (x.numel() // LINE) * LINE].view(-1, LINE).index_select(0, ids).reshape(-1)


def _signs_at(codes: Tensor, ids: Tensor) -> Tensor:
    """The reference signs (+1, -1, 0 as fp32) of the sampled lines: a line of 16 elements starts
    on a 16-element boundary, so its codes are exactly one int32 word."""
    words = codes.index_select(0, ids).to(torch.int64)[:, None] & 0xFFFFFFFF
    field = (words >> (2 * torch.arange(LINE, device=codes.device))) & 3
    return ((field == 1).float() - (field == 2).float()).reshape(-1)


def new_momentum(m: Tensor, g: Tensor, beta1: float, codes: Tensor | None, criterion: str,
                 grad_scale: Tensor | None, ids: Tensor | None) -> Tensor:
    """|m_new| on the lines `ids` (all elements when None) of flat fp32 m and flat g, as the engine
    computes it (module docstring); NaN momentum (a poisoned state) reads as 0. fp32 tensor ops
    with fp32 scalars round like the engine (one correctly rounded multiply or add each; checked
    bitwise through the exact threshold by tests/test_mofo.py)."""
    n = m.numel()
    if ids is not None:
        m, g = _gather_lines(m, ids), _gather_lines(g, ids)
    else:
        m = m.clone()
    g = g.float() if g.dtype != torch.float32 or ids is not None else g.clone()
    if grad_scale is not None:  # a true division, as the engine (torch divides by a scalar as a
        g = _div(g, grad_scale.reshape(1).to(device=g.device, dtype=torch.float32))  # reciprocal multiply)
    g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if codes is not None and criterion == "gradient":
        signs = unpack_signs(codes, n) if ids is None else _signs_at(codes, ids)
        g = torch.where(_collaborative(g, signs), g, torch.zeros_like(g))
    m_new = m.mul_(f32(beta1)).add_(g.mul_(f32(1.0 - beta1)))
    return m_new.abs_().nan_to_num_(nan=0.0)


def kth_largest(a: Tensor, k: int) -> Tensor:
    """The k-th largest value of a 1-D tensor (0-dim). topk is 2x faster than kthvalue here (a
    16K sample: 0.15 vs 0.33 ms), so it selects from whichever end is nearer."""
    n = a.numel()
    if k <= n - k + 1:
        return a.topk(k, sorted=False).values.min()
    return a.topk(n - k + 1, largest=False, sorted=False).values.max()


def threshold(m: Tensor, g: Tensor, alpha: float, beta1: float, codes: Tensor | None = None,
              criterion: str = "update", grad_scale: Tensor | None = None) -> tuple[float, float]:
    """(threshold, kept) for one tensor: the |m_new| threshold of its top-alpha fraction and the
    number of its elements at or above it (exact up to SAMPLE elements; above, estimated as
    k/SAMPLE of the tensor, ties in the sample not counted). alpha >= 1 keeps everything:
    threshold 0 (AdamW, bit for bit)."""
    n = m.numel()
    if alpha >= 1.0 or n == 0:
        return 0.0, float(n)
    ids = sample_lines(n, m.device) if n > SAMPLE else None
    a = new_momentum(m, g, beta1, codes, criterion, grad_scale, ids)
    k = max(1, int(alpha * a.numel()))
    t = kth_largest(a, k)
    if ids is not None:
        return float(t.item()), k * (n / a.numel())
    return float(t.item()), float((a >= t).sum().item())


def thresholds(tensors: list[tuple[Tensor, Tensor, Tensor | None]], alpha: float, beta1: float,
               criterion: str = "update", grad_scale: Tensor | None = None) -> list[tuple[float, float]]:
    """threshold() of every (m, g, codes) of a list (one device), the same values: the sampled
    tensors' samples are stacked and go through one set of ops and one batched topk, and one host
    read fetches all their thresholds (per tensor they cost ~10 small torch ops and a sync each,
    which on a 35-tensor model step was most of the threshold's cost)."""
    tensors = [(m.reshape(-1), g.reshape(-1), codes) for m, g, codes in tensors]  # codes count flat elements
    out: list[tuple[float, float] | None] = [None] * len(tensors)
    big = []
    for i, (m, g, codes) in enumerate(tensors):
        if alpha >= 1.0 or m.numel() <= SAMPLE:
            out[i] = threshold(m, g, alpha, beta1, codes, criterion, grad_scale)
        else:
            big.append(i)
    if big:
        ids = [sample_lines(tensors[i][0].numel(), tensors[i][0].device) for i in big]
        m = torch.stack([_gather_lines(tensors[i][0], d) for i, d in zip(big, ids)])
        g = torch.stack([_gather_lines(tensors[i][1], d).float() for i, d in zip(big, ids)])
        if grad_scale is not None:
            g = _div(g, grad_scale.reshape(1, 1).to(device=g.device, dtype=torch.float32))
        g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        if criterion == "gradient" and any(tensors[i][2] is not None for i in big):
            signs = torch.stack([_signs_at(tensors[i][2], d) if tensors[i][2] is not None
                                 else torch.zeros(SAMPLE, device=g.device) for i, d in zip(big, ids)])
            g = torch.where(_collaborative(g, signs), g, torch.zeros_like(g))
        a = m.mul_(f32(beta1)).add_(g.mul_(f32(1.0 - beta1))).abs_().nan_to_num_(nan=0.0)
        k = max(1, int(alpha * SAMPLE))
        if k <= SAMPLE - k + 1:
            t = a.topk(k, dim=1, sorted=False).values.amin(dim=1)
        else:
            t = a.topk(SAMPLE - k + 1, dim=1, largest=False, sorted=False).values.amax(dim=1)
        for i, value in zip(big, t.tolist()):
            out[i] = (value, k * (tensors[i][0].numel() / SAMPLE))
    return out
