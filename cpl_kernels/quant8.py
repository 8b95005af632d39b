"""The 8-bit blockwise state format of the step engine (docs/design.md section 8).

A state slot of n fp32 values is held as n uint8 codes plus one fp32 absmax per block of
BLOCK = 256 consecutive elements (the last block may be partial): element i is
`qmap[code[i]] * absmax[i // BLOCK]`. The maps are the dynamic quantization maps of bitsandbytes
and torchao (Dettmers et al. 2015/2022): `dynamic_map(signed=True)` for Adam's m (and any slot
that can be negative), `dynamic_map(signed=False)` for Adam's v. 2 B + 8/256 B = 2.03 B per
element for m and v together, instead of 8.

Quantizing a block (torchao's quantize_8bit_with_qmap, operation for operation, fp32):
  absmax = max |x| over the block (NaN if any element is NaN), clipped below at fp32(1e-12);
  y = x / absmax (a true division); code = the largest c with qmap[c] <= y (0 if none: also NaN),
  then c + 1 instead when y - qmap[c] >= (qmap[c + 1] - qmap[c]) * 0.5 (c < 255).
One departure from torchao, for the unsigned map (Adam's v) only: a y of at least FLT_MIN that
the rule would round to code 0 takes code 1 (`rule`). Without it an element whose v is under
~1.6e-7 of its block's absmax reads back v = 0 while its m does not, and its next step is m / eps
instead of m / sqrt(v); CPL, which zeroes the gradient of conflicting elements while their block's
absmax stays up, makes 3x more such elements than fine-tuning, and in the lab they were what made
CPL with 8-bit state forget 4.3 facts where fp32 state forgets 1.0 (docs/lab.md). Code 1 reads back
as 3.25e-7 of the absmax: a slightly larger v, so a slightly smaller step.
That rule, decided once per map, is a threshold per code: `thresholds(qmap)[c]` is the
smallest fp32 y for which the result is c + 1 or more (for the unsigned map's code 0: FLT_MIN), so
the code of y is the number of thresholds <= y. The kernels count them by an 8-step branchless
binary search over that table (256 entries, the last +inf; the C++ kernel reads a bucket table of
it); the reference below is torchao's algorithm itself plus the floor, and the tests check the two
agree on every map value, every threshold and their fp32 neighbours.

Small tensors (fewer than MIN_NUMEL elements) keep fp32 state, as bitsandbytes and torchao do.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

BLOCK = 256
MIN_NUMEL = 4096
ABSMAX_FLOOR = torch.tensor(1e-12, dtype=torch.float32).item()  # torchao's clip(1e-12), as the fp32 it becomes


def num_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def quantized(numel: int) -> bool:
    """Whether a tensor of `numel` elements gets 8-bit state (else fp32)."""
    return numel >= MIN_NUMEL


@functools.cache
def dynamic_map(signed: bool) -> tuple[float, ...]:
    """The 256 sorted fp32 values of the 8-bit dynamic map (bitsandbytes' create_dynamic_map with
    max_exponent_bits=7, total_bits=8, as torchao uses it). Per decade i = 0..6, the means of
    consecutive points of linspace(0.1, 1, 2**i + 1) (signed) or 2**(i+1) + 1 (unsigned), times
    10**(i - 6), with their negatives when signed; then 0 and 1. Computed as torch computes it
    (fp32 linspace and means, a Python float product), then rounded to fp32."""
    data: list[float] = []
    for i in range(7):
        items = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, items)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return tuple(torch.tensor(sorted(data), dtype=torch.float32).tolist())


def _search(y: Tensor, qmap: Tensor) -> Tensor:
    """torchao's quantize_8bit_with_qmap on fp32 values (the reference rule): int64 codes. Every
    operation is one fp32 operation (subtraction, multiplication by 0.5: correctly rounded)."""
    c = torch.where(y >= qmap[128], 128, 0)
    for step in (64, 32, 16, 8, 4, 2, 1):
        c = c + torch.where(y >= qmap[c + step], step, 0)
    up = (c + 1).clamp(max=255)
    down_v, up_v = qmap[c], qmap[up]
    return torch.where(y - down_v >= (up_v - down_v) * 0.5, up, c)


FLOOR = torch.finfo(torch.float32).tiny  # FLT_MIN: the least y an unsigned map never rounds to code 0


def rule(y: Tensor, qmap: Tensor) -> Tensor:
    """The reference rule: torchao's search (`_search`), except that with an unsigned map (its
    first entry 0: Adam's v) a y >= FLOOR takes code 1 or more (module docstring)."""
    c = _search(y, qmap)
    if float(qmap[0]) == 0.0:
        c = torch.where((c == 0) & (y >= FLOOR), 1, c)
    return c


def _keys(x: Tensor) -> Tensor:
    """int64 keys that order fp32 values as the values do (consecutive fp32, consecutive keys)."""
    bits = x.to(torch.float32).view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _from_keys(k: Tensor) -> Tensor:
    bits = torch.where(k >= 0, k, (-k) - 2**31)  # a negative value: sign bit set, as int32
    return bits.to(torch.int32).view(torch.float32)


@functools.cache
def thresholds(signed: bool) -> tuple[float, ...]:
    """Per code c < 255, the smallest fp32 y whose code is > c; entry 255 is +inf (module
    docstring). Found by bisection over the fp32 values in (qmap[c], qmap[c + 1]], which is
    exact: the code of y never decreases as y grows."""
    qmap = torch.tensor(dynamic_map(signed), dtype=torch.float32)
    codes = torch.arange(255)
    lo, hi = _keys(qmap[:-1]), _keys(qmap[1:])
    while bool((lo < hi).any()):  # 32 rounds at most: all 255 bisections at once
        mid = (lo + hi) // 2
        above = rule(_from_keys(mid), qmap) > codes
        open_ = lo < hi
        hi = torch.where(open_ & above, mid, hi)
        lo = torch.where(open_ & ~above, mid + 1, lo)
    return tuple(_from_keys(lo).tolist()) + (float("inf"),)


def qmaps(signed: tuple[bool, ...], device: torch.device | str = "cpu") -> Tensor:
    """The `qmaps` argument of cpl_step_8bit_: fp32 [2, 2, 256], per state slot its map values
    (row 0, dequantization) and thresholds (row 1, quantization). `signed` per slot; an unused
    second slot repeats the first."""
    rows = []
    for k in range(2):
        s = signed[min(k, len(signed) - 1)]
        rows.append([dynamic_map(s), thresholds(s)])
    return torch.tensor(rows, dtype=torch.float32, device=device)


# ---- the reference rule (pure torch, fp32) ---------------------------------------------------------

def dequantize(codes: Tensor, absmax: Tensor, qmap: Tensor) -> Tensor:
    """fp32 values of a slot: qmap[code] * absmax of its block (one fp32 multiply)."""
    n = codes.numel()
    scale = absmax.repeat_interleave(BLOCK)[:n]
    return qmap[codes.reshape(-1).long()] * scale


def block_absmax(x: Tensor) -> Tensor:
    """max |x| per block (NaN when the block holds one), clipped at ABSMAX_FLOOR; fp32."""
    n = x.numel()
    pad = num_blocks(n) * BLOCK - n
    a = torch.nn.functional.pad(x.reshape(-1).abs(), (0, pad)).view(-1, BLOCK)
    return a.amax(dim=1).clamp(min=ABSMAX_FLOOR)


def quantize_(x: Tensor, codes: Tensor, absmax: Tensor, qmap: Tensor) -> None:
    """Writes x (fp32, n elements) as codes (uint8, n) and absmax (fp32, num_blocks(n)), torchao's
    rule with the unsigned map's floor (module docstring)."""
    amax = block_absmax(x)
    y = x.reshape(-1) / amax.repeat_interleave(BLOCK)[:x.numel()]
    codes.view(-1).copy_(rule(y, qmap).to(torch.uint8))
    absmax.copy_(amax)


def quantize_by_thresholds(y: Tensor, thresh: Tensor) -> Tensor:
    """The kernels' rule: the number of thresholds <= y, by an 8-step branchless binary search
    (tested equal to the reference rule)."""
    c = torch.zeros_like(y, dtype=torch.int64)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        c = c + torch.where(y >= thresh[c + step - 1], step, 0)
    return c
