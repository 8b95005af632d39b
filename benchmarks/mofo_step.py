"""MoFOAdamW's step beside torch's fused AdamW, CPLAdamW and the in-place bandwidth stream, timed in
the same interleaved rounds (benchmarks/common.py), at 16M and 64M fp32 Llama-shaped tensors.

`python -m benchmarks.mofo_step [--sizes 16M,64M] [--rounds 7]`. The same MoFO rows are in
`python -m benchmarks.report` (benchmarks/cases.py: mofo_cases); this runs only them. Target:
MoFOAdamW (default options) <= 1.15x torch fused AdamW at 16M-64M on CPU.
"""
from __future__ import annotations

import argparse

import torch

from cpl_kernels import CPLAdamW

from .cases import mofo_cases
from .common import SIZES, Case, bandwidth_case, clone_params, gbps, make_params, reference_grads, run_interleaved


def cases(total: int) -> list[Case]:
    base = make_params(total)
    refs = reference_grads(base)
    n = sum(p.numel() for p in base)
    fused = torch.optim.AdamW(clone_params(base), fused=True)
    fused.step()
    plain = CPLAdamW(clone_params(base))
    plain.clear_reference()
    plain.step()
    return [Case("torch AdamW fused=True", "torch", fused.step, 28.0, 8.0, n),
            Case("CPLAdamW cpp fp32, no reference", "cpl", plain.step, 28.0, 8.0, n,
                 note="the same engine pass without the filter")] + mofo_cases(base, refs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16M,64M")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    print("| size | case | median ms | x torch fused AdamW | B/param moved | GB/s | % of in-place BW | note |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        rows = cases(SIZES[size])
        bw = bandwidth_case()
        run_interleaved([bw] + rows, args.rounds)
        fused = rows[0].median_s
        for c in [bw] + rows:
            print(f"| {size} | {c.name} | {c.median_s * 1e3:.1f} | {c.median_s / fused:.2f} | "
                  f"{c.bytes_per_param:.2f} | {gbps(c):.1f} | {100 * gbps(c) / gbps(bw):.0f}% | {c.note} |")
        del rows, bw


if __name__ == "__main__":
    main()
