"""One command for the CPU benchmark report: `python -m benchmarks.report` (or `make bench`).

Prints a markdown table and writes benchmarks/results/{cpu_steps.csv, cpu_steps.png, cpu_report.md}
(+ peak_memory.csv). Per size, every row is timed in the same interleaved rounds as the in-place
bandwidth stream and torch's fused AdamW, so % of bandwidth and the ratio to fused AdamW compare
like with like even on a shared machine. About 3 minutes on a 2-core CPU with the peak-memory
runs; --quick: 16M only, 5 rounds, no memory runs.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import os
import platform

import torch

from . import peak_memory
from .cases import all_cases
from .common import SIZES, bandwidth_case, gbps, run_interleaved

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIELDS = ["size", "name", "median_ms", "gbps", "pct_bandwidth", "x_torch_fused", "bytes_per_param",
          "state_bytes_per_param", "rounds", "note"]


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def measure(size: str, rounds: int, groups: tuple[str, ...] | None = None) -> list[dict]:
    cases = all_cases(SIZES[size], small=size == "16M", groups=groups)
    bw = bandwidth_case()
    run_interleaved([bw] + cases, rounds)
    bandwidth = gbps(bw)
    fused = next(c for c in cases if c.name == "torch AdamW fused=True").median_s
    rows = []
    for c in [bw] + cases:
        rows.append(dict(
            size=size, name=c.name, median_ms=round(c.median_s * 1e3, 2), gbps=round(gbps(c), 1),
            pct_bandwidth=round(100 * gbps(c) / bandwidth), x_torch_fused=round(c.median_s / fused, 2),
            bytes_per_param=round(c.bytes_per_param, 3),
            state_bytes_per_param="" if c.state_bytes_per_param is None else round(c.state_bytes_per_param, 3),
            rounds=len(c.times), note=c.note))
    del cases, bw
    gc.collect()
    return rows


def table(rows: list[dict]) -> str:
    head = "| size | case | median ms | GB/s | % of in-place BW | x torch fused AdamW | B/param moved | state B/param |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['size']} | {r['name']} | {r['median_ms']} | {r['gbps']} | {r['pct_bandwidth']}% | "
                     f"{r['x_torch_fused']} | {r['bytes_per_param']} | {r['state_bytes_per_param']} |")
    return "\n".join(lines)


def targets(rows: list[dict], memory: list[dict]) -> list[str]:
    """The issue's targets (16M fp32; MoFO at every size), read off the measured rows."""
    mofo = [f"MoFOAdamW ({x['size']}, default options{', reference set' if 'reference' in x['name'] else ''}) / "
            f"torch fused AdamW: {x['x_torch_fused']}x (target <= 1.15), {x['pct_bandwidth']}% of bandwidth"
            for x in rows if x["name"].startswith("MoFOAdamW")]
    r = {x["name"]: x for x in rows if x["size"] == "16M"}
    sgd = min((r[k] for k in ("torch SGD momentum fused=True", "torch SGD momentum foreach=True") if k in r),
              key=lambda x: x["median_ms"], default=None)
    out = []
    if "CPLAdamW cpp fp32" in r:  # absent when only some groups were measured (--groups)
        cpl, paper = r["CPLAdamW cpp fp32"], r["paper-style eager CPL AdamW"]
        out += [
            f"CPLAdamW (default options, reference set) / torch fused AdamW: {cpl['x_torch_fused']}x (target <= 1.05)",
            f"paper-style eager / CPLAdamW: {paper['median_ms'] / cpl['median_ms']:.1f}x slower (target >= 3)",
            f"CPLAdamW % of in-place bandwidth: {cpl['pct_bandwidth']}% (target >= 70%)",
        ]
    if "CPLAdamW cpp fp32, no reference" in r:
        out.append(f"CPLAdamW, no reference / torch fused AdamW: "
                   f"{r['CPLAdamW cpp fp32, no reference']['x_torch_fused']}x (target <= 1.02)")
    if sgd and "CPLSGD momentum cpp fp32" in r:
        out.append(f"CPLSGD momentum / the faster torch SGD momentum: "
                   f"{r['CPLSGD momentum cpp fp32']['median_ms'] / sgd['median_ms']:.2f}x (target <= 1.05)")
    for name in ("contribution_stats(a, b, mask)", "contribution_stats_codes(a, codes, mask)",
                 "cpl_mask_words(a, b, mask, offsets)", "cpl_mask_words(a, codes, mask, offsets)"):
        if name in r:
            out.append(f"{name}: {r[name]['pct_bandwidth']}% of the in-place bandwidth (target >= 60%)")
    # MaskedAdamW, default options (issue 12's targets), at every size measured.
    for size in sorted({x["size"] for x in rows}, key=lambda s: SIZES[s]):
        at = {x["name"]: x for x in rows if x["size"] == size}
        for name, target in (("MaskedAdamW 30% active (random)", 0.8), ("MaskedAdamW 30% active (rows)", 0.6),
                             ("MaskedAdamW 100% active (random)", 1.05)):
            if name in at:
                out.append(f"{size} {name} / torch fused AdamW: {at[name]['x_torch_fused']}x (target <= {target}), "
                           f"state {at[name]['state_bytes_per_param']} B/param")
    out += mofo
    extra = {x["optimizer"]: x for x in memory if x["model"] == "llama-100m"}
    if "cpladamw" in extra and "adamw" in extra:
        out.append(f"CPLAdamW extra peak memory over AdamW (100M Llama step): "
                   f"{extra['cpladamw']['extra_b_per_param']} B/param (target <= 0.26); paper-style: "
                   f"{extra['paper']['extra_b_per_param']} B/param")
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size"] for r in rows}, key=lambda s: SIZES[s])
    fig, axes = plt.subplots(1, len(sizes), figsize=(8 * len(sizes), 7), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        sub = [r for r in rows if r["size"] == size]
        names = [r["name"] for r in sub]
        ax.barh(names, [r["pct_bandwidth"] for r in sub], color="tab:blue")
        ax.axvline(100, color="k", lw=0.8)
        ax.set_xlabel("% of in-place bandwidth (bytes counted / time), higher is better")
        ax.set_title(f"{size} elements, model-shaped tensors")
        for y, r in enumerate(sub):
            ax.text(max(r["pct_bandwidth"], 1) + 1, y, f"{r['x_torch_fused']}x fused AdamW", va="center", fontsize=7)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows, memory, out_dir: str, command: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "cpu_steps.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    if memory:
        peak_memory.write_csv(memory, os.path.join(out_dir, "peak_memory.csv"))
    plot(rows, os.path.join(out_dir, "cpu_steps.png"))
    with open(os.path.join(out_dir, "cpu_report.md"), "w") as f:
        f.write(f"# CPU benchmark results\n\nDate: {datetime.date.today().isoformat()}\n\n"
                f"Machine: {machine()}\n\nCommand: `{command}`\n\n"
                "Bytes counted per row: see benchmarks/cases.py. Medians of interleaved rounds.\n\n")
        f.write(table(rows) + "\n\n")
        if memory:
            f.write(peak_memory.table(memory) + "\n\n")
        f.write("Targets:\n\n" + "\n".join(f"- {t}" for t in targets(rows, memory)) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16M,64M", help="comma list of " + ",".join(SIZES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess runs")
    ap.add_argument("--quick", action="store_true", help="16M only, 5 rounds, no memory runs")
    ap.add_argument("--groups", default=None,
                    help="comma list of cpl, mofo, masked, ops: only those rows besides torch's (default: all)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds, args.no_memory = "16M", 5, True
    torch.set_num_threads(2)
    print(f"machine: {machine()}", flush=True)
    rows = []
    for size in args.sizes.split(","):
        print(f"timing {size} ...", flush=True)
        rows += measure(size, args.rounds, tuple(args.groups.split(",")) if args.groups else None)
    print(table(rows), flush=True)
    memory = [] if args.no_memory else peak_memory.run_all()
    if memory:
        print(peak_memory.table(memory))
    for t in targets(rows, memory):
        print("target:", t)
    cmd = "python -m benchmarks.report" + (" " + " ".join(argv if argv is not None else __import__("sys").argv[1:])).rstrip()
    write(rows, memory, args.out, cmd)
    print(f"wrote {args.out}/cpu_steps.csv, cpu_steps.png, cpu_report.md")


if __name__ == "__main__":
    main()
