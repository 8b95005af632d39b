"""GPU step benchmark: CPL AdamW (CUDA and Triton) vs torch fused AdamW and the in-place bandwidth.

For TOTAL fp32 params split into model-shaped tensors it measures, with CUDA events, the median
time of: in-place `x.mul_(c)` on one tensor of the same total size (the bandwidth reference: an
optimizer writes in place), torch.optim.AdamW(fused=True).step(), and a full CPL AdamW step with
sign codes set on each available backend (the multi-tensor CUDA op and the per-tensor Triton
loop). It prints a markdown table and writes CSV + markdown to --out.

Bytes per param: AdamW 28 (read p, g, m, v; write p, m, v, fp32), CPL 28.25 (+ 2-bit codes).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics

import torch

from cpl_kernels import _backend, ops
from cpl_kernels import engine


def model_shapes(total: int, hidden: int = 2048, ffn: int = 5632, vocab: int = 32000) -> list[tuple]:
    """TinyLlama-like tensors (embedding, attention, MLP, norms) until `total` elements are reached."""
    shapes = [(vocab, hidden)]
    layer = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,), (hidden,)]
    count = vocab * hidden
    while count < total:
        for s in layer:
            n = 1
            for d in s:
                n *= d
            if count + n > total:
                rest = total - count
                if rest > 0:
                    shapes.append((rest,))
                return shapes
            shapes.append(s)
            count += n
    return shapes


def time_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=256 * 2**20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "gpu_bench.py needs a CUDA GPU"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    shapes = model_shapes(args.params)
    total = sum(torch.Size(s).numel() for s in shapes)
    rows = []

    x = torch.randn(total, device=dev)
    ms = time_ms(lambda: x.mul_(1.0000001), args.warmup, args.iters)
    bw = 8 * total / ms / 1e6  # read + write 4 B each, GB/s
    rows.append(dict(kernel="in-place mul_ (bandwidth)", ms=ms, bytes_per_param=8.0, gbs=bw))
    del x

    params = [torch.randn(s, device=dev) for s in shapes]
    grads = [torch.randn_like(p) for p in params]

    tp = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(tp, grads):
        p.grad = g
    opt = torch.optim.AdamW(tp, lr=1e-3, weight_decay=0.01, fused=True)
    ms = time_ms(opt.step, args.warmup, args.iters)
    torch_ms = ms
    rows.append(dict(kernel="torch AdamW fused", ms=ms, bytes_per_param=28.0, gbs=28 * total / ms / 1e6))
    del opt, tp

    codes = [ops.pack_signs_(torch.randn_like(p)) for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    step = torch.tensor(1.0, dtype=torch.float64, device=dev)
    lr = torch.tensor(1e-3, dtype=torch.float64, device=dev)

    def cpl_step():
        engine.cpl_step_(params, grads, m, v, codes, "adamw", step, lr, [0.9, 0.999, 1e-8, 0.01])

    backends = []
    if _backend.has_native_kernel("CUDA"):
        backends.append("cuda")
    if _backend.triton_available():
        backends.append("triton")
    for name in backends:
        os.environ["CPL_BACKEND"] = name
        try:
            ms = time_ms(cpl_step, args.warmup, args.iters)
            rows.append(dict(kernel=f"CPL AdamW step ({name})", ms=ms, bytes_per_param=28.25,
                             gbs=28.25 * total / ms / 1e6))
        finally:
            os.environ.pop("CPL_BACKEND", None)

    for r in rows:
        r["pct_of_bandwidth"] = 100.0 * r["gbs"] / bw
        r["ratio_to_torch_fused"] = r["ms"] / torch_ms if r["bytes_per_param"] > 8 else float("nan")
    header = ["kernel", "ms", "bytes_per_param", "gbs", "pct_of_bandwidth", "ratio_to_torch_fused"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    lines = [f"{torch.cuda.get_device_name()}, {total / 2**20:.0f}M fp32 params in {len(shapes)} tensors, "
             f"median of {args.iters}", "",
             "| kernel | median ms | B/param | GB/s | % of mul_ bandwidth | x torch fused AdamW |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['ms']:.3f} | {r['bytes_per_param']} | {r['gbs']:.0f} | "
                     f"{r['pct_of_bandwidth']:.1f} | {r['ratio_to_torch_fused']:.3f} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
