"""The 8-bit state benchmark alone (a subset of `python -m benchmarks.report`): CPLAdamW8bit against
torch's fused AdamW, CPLAdamW (fp32 state) and torchao's AdamW8bit on the Llama-shaped tensor sets,
side by side with the in-place bandwidth stream, medians of interleaved rounds.

    python -m benchmarks.bench_8bit [--sizes 16M,64M] [--rounds 7]

Prints one markdown table per size: median ms, GB/s, % of the in-place bandwidth, ratio to torch
fused AdamW, bytes moved and optimizer state bytes per parameter (state_bytes())."""
from __future__ import annotations

import argparse

import torch

from cpl_kernels import CPLAdamW, CPLAdamW8bit, state_bytes

from .cases import _stepper, state_bytes_torchao
from .common import SIZES, Case, bandwidth_case, clone_params, gbps, make_params, reference_grads, run_interleaved


def cases(base, refs) -> list[Case]:
    """Byte counts: benchmarks/cases.py's docstring."""
    n = sum(p.numel() for p in base)
    fused = torch.optim.AdamW(clone_params(base), lr=1e-3, fused=True)
    out = [Case("torch AdamW fused=True", "adamw", _stepper(fused), 28.0, state_bytes(fused) / n, n)]
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        AdamW8bit = None
    if AdamW8bit is not None:
        ao = AdamW8bit(clone_params(base), lr=1e-3)
        out.append(Case("torchao AdamW8bit", "adamw", _stepper(ao), 16.06, None, n, note="torch.compile'd"))
        out[-1].state_bytes_per_param = state_bytes_torchao(ao) / n
    for name, cls, nbytes, with_ref in (("CPLAdamW cpp fp32", CPLAdamW, 28.25, True),
                                        ("CPLAdamW8bit cpp fp32", CPLAdamW8bit, 16.31, True),
                                        ("CPLAdamW8bit cpp fp32, no reference", CPLAdamW8bit, 16.06, False)):
        params = clone_params(base)
        opt = cls(params, lr=1e-3)
        if with_ref:
            opt.set_reference_from_grads(refs)
        else:
            opt.clear_reference()
        run = _stepper(opt)
        out.append(Case(name, "cpl", run, nbytes, opt.state_bytes() / n, n))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16M,64M")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    for size in args.sizes.split(","):
        base = make_params(SIZES[size])
        refs = reference_grads(base)
        rows = cases(base, refs)
        bw = bandwidth_case()
        run_interleaved([bw] + rows, args.rounds)
        fused = rows[0].median_s
        print(f"\n{size} ({sum(p.numel() for p in base):,} params, {args.rounds} rounds)\n")
        print("| case | median ms | GB/s | % of in-place BW | x torch fused AdamW | B/param moved | state B/param |")
        print("|---|---|---|---|---|---|---|")
        for c in [bw] + rows:
            state = "" if c.state_bytes_per_param is None else f"{c.state_bytes_per_param:.3f}"
            print(f"| {c.name} | {c.median_s * 1e3:.1f} | {gbps(c):.1f} | {100 * gbps(c) / gbps(bw):.0f} | "
                  f"{c.median_s / fused:.2f} | {c.bytes_per_param:g} | {state} |")
        del base, refs, rows, bw


if __name__ == "__main__":
    main()
