"""MoFO's per-tensor threshold: the |m_new| above which an element's update is applied, chosen so
that about the top-alpha fraction of the tensor passes (cpl_kernels/optim/mofo.py).

m_new is the momentum the step is about to write, `beta1*m + (1-beta1)*g` with g as the engine
sees it (unscaled by grad_scale, non-finite elements as 0, conflicting elements zeroed under
criterion "gradient": reference_step.py steps 1-4), computed here in the engine's rounding, so the
threshold is taken over exactly the values the engine compares it with.

Exact for tensors of at most SAMPLE elements: the k-th largest |m_new| with k = max(1,
floor(alpha*n)) (the authors' code: `topk(|m|, int(n*fraction)).min()`), and every element
>= it passes, so ties at the threshold all pass (at least k elements are updated, more only on
ties). Larger tensors: the same quantile of a fixed sample of SAMPLE positions (below), so the
extra read is SAMPLE elements of m and of g (one cache line each: 2 x 1 MiB of traffic for any
size, against AdamW's 28 B per element), not a pass over the tensor. The fraction it keeps then
differs from alpha by the sampling error of a quantile, about sqrt(alpha*(1-alpha)/SAMPLE)
(0.0028 at alpha = 0.15, 2% of alpha); tests/test_mofo.py checks |kept - alpha| <=
kept_error_bound(alpha) (5 of those, 0.014 at 0.15) on normal, heavy-tailed, column-scaled and
partly-zero tensors.

The sample positions are floor(frac(i*phi)*n), i < SAMPLE, phi the golden ratio (a Weyl
sequence): spread evenly over the whole tensor and over every column of any row length (a plain
stride n // SAMPLE hits only a few columns of a matrix whose row length shares its factors),
fixed per size (so a resumed run picks the same thresholds: nothing random to checkpoint), and
cached per (size, device).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..reference import _collaborative, _div, f32, unpack_signs

# 16,384: the threshold of a 262K-8M tensor took 0.4-2 ms with it under load (4.6-10.7 ms with
# 65,536, which would cost a 35-tensor 16M model step more than the 1.15x-AdamW target allows).
SAMPLE = 1 << 14
_PHI = (math.sqrt(5.0) - 1.0) / 2.0
_POSITIONS: dict[tuple[int, torch.device], Tensor] = {}


def kept_error_bound(alpha: float, sample: int = SAMPLE) -> float:
    """The bound tests/test_mofo.py holds the sampled threshold to: |kept fraction - alpha| at most
    5 standard deviations of a sample quantile plus one sample element."""
    return 5.0 * math.sqrt(alpha * (1.0 - alpha) / sample) + 1.0 / sample


def sample_positions(n: int, device: torch.device, sample: int = SAMPLE) -> Tensor:
    """The int64 positions sampled in a tensor of n > sample elements (cached)."""
    key = (n, device, sample)
    pos = _POSITIONS.get(key)
    if pos is None:
        frac = torch.remainder(torch.arange(sample, dtype=torch.float64) * _PHI, 1.0)
        pos = (frac * n).floor().to(torch.int64).clamp_(0, n - 1).to(device)
        _POSITIONS[key] = pos
    return pos


def _signs_at(codes: Tensor, pos: Tensor) -> Tensor:
    """The reference signs (+1, -1, 0 as fp32) of the 2-bit codes at positions pos."""
    words = codes[pos // 16].to(torch.int64) & 0xFFFFFFFF
    field = (words >> (2 * (pos % 16))) & 3
    return (field == 1).float() - (field == 2).float()


def new_momentum(m: Tensor, g: Tensor, beta1: float, codes: Tensor | None, criterion: str,
                 grad_scale: Tensor | None, pos: Tensor | None) -> Tensor:
    """|m_new| at `pos` (all elements when None) of flat fp32 m and flat g, as the engine computes
    it (module docstring); NaN momentum (a poisoned state) reads as 0. fp32 tensor ops with fp32
    scalars round like the engine (one correctly rounded multiply or add each; checked bitwise by
    tests/test_mofo.py through the exact threshold), and take half the time of reference.py's."""
    n = m.numel()
    if pos is not None:
        m, g = m.index_select(0, pos), g.index_select(0, pos)
    else:
        m = m.clone()
    g = g.float() if g.dtype != torch.float32 or pos is not None else g.clone()
    if grad_scale is not None:  # a true division, as the engine (torch divides by a scalar as a
        g = _div(g, grad_scale.reshape(1).to(device=g.device, dtype=torch.float32))  # reciprocal multiply)
    g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if codes is not None and criterion == "gradient":
        signs = unpack_signs(codes, n) if pos is None else _signs_at(codes, pos)
        g = torch.where(_collaborative(g, signs), g, torch.zeros_like(g))
    m_new = m.mul_(f32(beta1)).add_(g.mul_(f32(1.0 - beta1)))
    return m_new.abs_().nan_to_num_(nan=0.0)


def threshold(m: Tensor, g: Tensor, alpha: float, beta1: float, codes: Tensor | None = None,
              criterion: str = "update", grad_scale: Tensor | None = None,
              sample: int = SAMPLE) -> tuple[float, float]:
    """(threshold, kept) for one tensor: the |m_new| threshold of its top-alpha fraction and the
    number of its elements at or above it (exact up to `sample` elements; above, estimated as
    k/sample of the tensor, ties in the sample not counted). alpha >= 1 keeps everything:
    threshold 0 (AdamW, bit for bit)."""
    n = m.numel()
    if alpha >= 1.0 or n == 0:
        return 0.0, float(n)
    pos = sample_positions(n, m.device, sample) if n > sample else None
    a = new_momentum(m, g, beta1, codes, criterion, grad_scale, pos)
    k = max(1, int(alpha * a.numel()))
    t = a.kthvalue(a.numel() - k + 1).values
    if pos is not None:
        return float(t.item()), k * (n / a.numel())
    return float(t.item()), float((a >= t).sum().item())
