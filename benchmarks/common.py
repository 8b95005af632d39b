"""Shared pieces of the CPU benchmarks: model-shaped tensors, side-by-side timing, byte counts.

Timing: every case of one size is run once per round, rounds repeated, and the median per case
is reported. Interleaving matters on a shared 2-core machine: the load drifts over seconds, and
cases timed back to back in separate blocks see different machines. Ratios (to torch's fused
AdamW, to the in-place bandwidth) are formed from medians of the same rounds.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

MIB = 2**20
SIZES = {"16M": 16 * MIB, "64M": 64 * MIB}
BANDWIDTH_ELEMENTS = 64 * MIB  # in-place x.mul_(c) on 256 MiB fp32: far larger than the 32 MiB L3


def llama_shapes(total: int) -> list[tuple[int, ...]]:
    """Llama-like tensors (embedding, q/k/v/o, gate/up/down, two norms per layer) until `total`
    elements; the last tensor takes the remainder so the total is exact."""
    hidden = 512 if total <= 16 * MIB else 1024
    ffn, vocab = int(hidden * 2.6875), 16 * hidden
    layer = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,), (hidden,)]
    shapes, count = [(vocab, hidden)], vocab * hidden
    while True:
        for s in layer:
            n = 1
            for d in s:
                n *= d
            if count + n >= total:
                if total - count > 0:
                    shapes.append((total - count,))
                return shapes
            shapes.append(s)
            count += n


def make_params(total: int, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """Leaf parameters with gradients set (N(0,1) values, N(0,1e-2) gradients)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in llama_shapes(total):
        p = torch.randn(s, generator=gen).to(dtype).requires_grad_()
        p.grad = (torch.randn(s, generator=gen) * 1e-2).to(dtype)
        params.append(p)
    return params


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_()
        q.grad = p.grad.clone()
        out.append(q)
    return out


def reference_grads(params: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    """A mastered reference gradient per param: random signs, so about half the elements conflict
    (what the lab measures per step, docs/lab.md), and some exact zeros (rows the mastered loss never
    touches keep r == 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in params:
        r = torch.randn(p.shape, generator=gen)
        r[torch.rand(p.shape, generator=gen) < 0.05] = 0.0
        out.append(r.to(p.dtype))
    return out


@dataclass
class Case:
    """One benchmark row. `run` does one step/call; bytes and state are per parameter element."""
    name: str
    group: str
    run: Callable[[], object]
    bytes_per_param: float
    state_bytes_per_param: float | None
    numel: int
    note: str = ""
    rounds: int | None = None  # fewer rounds for slow cases (the reference backend)
    times: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)


def time_once(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_interleaved(cases: list[Case], rounds: int, warmup: int = 1) -> None:
    """Runs every case once per round (after `warmup` untimed calls), appending to case.times."""
    for c in cases:
        for _ in range(warmup if c.rounds is None else 0):  # slow cases: their setup step warmed up
            c.run()
    for r in range(rounds):
        for c in cases:
            if c.rounds is None or r < c.rounds:
                c.times.append(time_once(c.run))


def bandwidth_case(numel: int = BANDWIDTH_ELEMENTS) -> Case:
    """The bandwidth reference: in-place x.mul_(c) reads and writes 8 B per fp32 element."""
    x = torch.rand(numel)
    return Case("in-place x.mul_(c) (bandwidth reference)", "bandwidth", lambda: x.mul_(1.0000001), 8.0,
                None, numel, note="8 B/elem: read + write fp32")


def lines_touched(mask: torch.Tensor, elems_per_line: int) -> float:
    """Fraction of cache lines (64 B) of a dense tensor holding at least one active element."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % elems_per_line
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.bool)])
    return float(flat.view(-1, elems_per_line).any(dim=1).float().mean())


def gbps(case: Case) -> float:
    return case.bytes_per_param * case.numel / case.median_s / 1e9
