"""MaskedAdamW.update_masks: what one mask change costs, beside one torch fused AdamW step and the
in-place bandwidth stream, timed in the same interleaved rounds (benchmarks/common.py).

`python -m benchmarks.mask_update [--size 16M] [--rounds 7]`. Cases: a change between two
independent random masks (about 9% of the elements kept at 30% active: the worst case for the
gather and scatter), and a change that keeps most of the mask (the lab's epoch-to-epoch CPL
masks change a few percent of their elements: 95% kept here). Every call migrates between the two
masks of its pair, alternately.

Bytes counted per parameter element (what the migration must move): read both masks' words
(0.25), write the new block offsets (0.008), read m and v of the kept elements (8 * kept), write
the new m and v (8 * new); the implementation also zero-fills the new m and v first (8 * new more)
and unpacks each chunk to bools (temporaries in cache, not counted).
"""
from __future__ import annotations

import argparse

import torch

from cpl_kernels import MaskedAdamW

from .common import SIZES, Case, bandwidth_case, clone_params, gbps, make_params, run_interleaved


def _alternate(opt, masks_a, masks_b):
    turn = [0]

    def run():
        opt.update_masks(masks_b if turn[0] % 2 == 0 else masks_a)
        turn[0] += 1
    return run


def cases(total: int) -> list[Case]:
    base = make_params(total)
    n = sum(p.numel() for p in base)
    gen = torch.Generator().manual_seed(3)
    fused_params = clone_params(base)
    fused = torch.optim.AdamW(fused_params, fused=True)
    fused.step()
    out = [Case("torch AdamW fused=True (one step)", "torch", fused.step, 28.0, 8.0, n)]
    a = [torch.rand(p.shape, generator=gen) < 0.3 for p in base]
    independent = [torch.rand(p.shape, generator=gen) < 0.3 for p in base]
    # Near: flip 5% of each mask's active elements off and as many frozen ones on.
    near = []
    for m in a:
        flip = torch.rand(m.shape, generator=gen) < 0.05 * 0.3 / 0.7
        drop = torch.rand(m.shape, generator=gen) < 0.05
        near.append((m & ~drop) | (~m & flip))
    for label, b in (("independent 30% masks", independent), ("30% masks, 95% kept", near)):
        kept = sum(int((x & y).sum()) for x, y in zip(a, b)) / n
        new = sum(int(y.sum()) for y in b) / n
        opt = MaskedAdamW(clone_params(base), a, check_finite=False)
        opt.step()
        out.append(Case(f"update_masks, {label}", "update", _alternate(opt, a, b),
                        0.258 + 8 * kept + 8 * new, opt.state_bytes() / n, n,
                        note=f"{kept:.3f} of the elements kept, {new:.3f} active after"))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="16M", choices=sorted(SIZES))
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    rows = cases(SIZES[args.size])
    bw = bandwidth_case()
    run_interleaved([bw] + rows, args.rounds)
    fused = rows[0].median_s
    print(f"{args.size} fp32 Llama-shaped, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds")
    print("| case | median ms | x torch fused AdamW step | B/param moved | GB/s | % of in-place BW | note |")
    print("|---|---|---|---|---|---|---|")
    for c in [bw] + rows:
        print(f"| {c.name} | {c.median_s * 1e3:.1f} | {c.median_s / fused:.2f} | {c.bytes_per_param:.2f} | "
              f"{gbps(c):.1f} | {100 * gbps(c) / gbps(bw):.0f}% | {c.note} |")


if __name__ == "__main__":
    main()
