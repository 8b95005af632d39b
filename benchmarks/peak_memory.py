"""Peak memory of one full training step (forward, backward, optimizer step) of a random-init Llama,
for torch AdamW, the paper-style eager CPL and CPLAdamW: `python -m benchmarks.peak_memory`.

How it is measured, and why: each (model, optimizer) runs in a fresh subprocess. It builds the
model, sets the CPL reference from a "mastered" batch (CPLAdamW: 2-bit codes; paper-style: fp32
gradient copies), runs one warm-up step (so the optimizer state exists, as in training), then resets
the kernel's peak-RSS counter (writing 5 to /proc/self/clear_refs resets VmHWM) and runs the
measured step; the peak is VmHWM from /proc/self/status. CPU tensors are allocated straight from
malloc (torch has no caching allocator on CPU), so resident memory is what the step really holds;
ru_maxrss cannot be reset and would include import-time and warm-up peaks, so it is only the
fallback where clear_refs is not writable. The same import, model and data in every subprocess
make the differences between optimizers meaningful; "extra" is the peak minus torch AdamW's.

`--masks` measures building MaskedAdamW's CPL masks of a model instead (issue 12): the two mean
gradients are computed first (cpl_kernels.mean_gradients over one injection and one mastered
batch) and held; then, with the peak counter reset, the masks are built, and "extra" is the peak
minus the resident memory before (what building the masks adds beyond the two gradients,
including the masks themselves). Modes: "packed" (cpl_masks_once(..., packed=True): the
cpl_mask_words op, bits and block offsets), "packed-codes" (the reference gradient packed to
2-bit sign codes first and freed, then the masks from one gradient and the codes), "bool" (the
bool masks of cpl_masks_once(...)), and "bool-before" (the sign comparisons on bool tensors that
cpl_masks_once ran before issue 12).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

MODELS = {
    # The lab's default model size (docs/lab.md): about 349K params (tied embeddings).
    "llama-small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=160, tie_word_embeddings=True, batch=32, seq=16),
    # ~96M params, random init.
    "llama-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=16384, batch=2, seq=128),
}
OPTIMIZERS = ("adamw", "paper", "cpladamw")


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(model_name: str, optimizer: str) -> dict:
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpl_kernels.optim import CPLAdamW
    from .paper_style import PaperStyleCPLAdamW

    torch.set_num_threads(2)
    torch.manual_seed(0)
    spec = dict(MODELS[model_name])
    batch, seq = spec.pop("batch"), spec.pop("seq")
    model = LlamaForCausalLM(LlamaConfig(**spec, max_position_embeddings=seq))
    n = sum(p.numel() for p in model.parameters())
    params = list(model.parameters())
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    elif optimizer == "paper":
        opt = PaperStyleCPLAdamW(params, lr=1e-4)
    else:
        opt = CPLAdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    mastered = torch.randint(0, spec["vocab_size"], (batch, seq), generator=gen)
    inject = torch.randint(0, spec["vocab_size"], (batch, seq), generator=gen)

    def train_step():
        model(input_ids=inject, labels=inject).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # The mastered backward runs for every optimizer, AdamW included, so the heaps have seen the
    # same allocations (skipping it for AdamW made CPLAdamW look 50 MiB heavier on the 96M model).
    model(input_ids=mastered, labels=mastered).loss.backward()
    if optimizer != "adamw":  # the mastered reference, once (as the paper: per epoch)
        opt.set_reference() if optimizer == "paper" else opt.set_reference_from_grads()
    opt.zero_grad(set_to_none=True)
    train_step()  # warm-up: optimizer state allocated
    before = _rss_kib("VmRSS")
    exact = _reset_peak()
    train_step()
    peak = _rss_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(model=model_name, optimizer=optimizer, params=n, rss_before_mib=round(before / 1024, 1),
                peak_mib=round(peak / 1024, 1), method="VmHWM after clear_refs" if exact else "ru_maxrss")


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


MASK_MODES = ("packed", "packed-codes", "bool", "bool-before")


def child_masks(model_name: str, mode: str) -> dict:
    import gc

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpl_kernels import cpl_masks_once, mean_gradients, ops

    torch.set_num_threads(2)
    torch.manual_seed(0)
    spec = dict(MODELS[model_name])
    batch, seq = spec.pop("batch"), spec.pop("seq")
    model = LlamaForCausalLM(LlamaConfig(**spec, max_position_embeddings=seq))
    n = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    mastered = torch.randint(0, spec["vocab_size"], (batch, seq), generator=gen)
    inject = torch.randint(0, spec["vocab_size"], (batch, seq), generator=gen)

    def loss_fn(m, ids):
        return m(input_ids=ids, labels=ids).loss

    new = mean_gradients(model, [inject], loss_fn)
    ref = mean_gradients(model, [mastered], loss_fn)
    gc.collect()
    # Hand the heap's free pages (the backward's activations) back to the kernel first: otherwise
    # the masks reuse resident free memory and RSS does not see them (measured: the packed masks'
    # own 12 MiB did not show at all).
    _malloc_trim()
    before = _rss_kib("VmRSS")
    exact = _reset_peak()
    if mode == "packed":
        masks = cpl_masks_once(new, ref, packed=True)
    elif mode == "packed-codes":  # the reference kept as 2-bit codes: one gradient is freed first
        for k in list(ref):
            ref[k] = None if ref[k] is None else ops.pack_signs_(ref[k])
        masks = cpl_masks_once(new, ref, packed=True)
    elif mode == "bool":
        masks = cpl_masks_once(new, ref)
    else:  # the implementation before issue 12, for comparison
        masks = {k: ~(((g > 0) & (ref[k] < 0)) | ((g < 0) & (ref[k] > 0))) for k, g in new.items()}
    peak = _rss_kib("VmHWM") if exact else None
    active = sum((m.active if hasattr(m, "active") else int(m.sum())) for m in masks.values())
    return dict(model=model_name, mode=mode, params=n, rss_before_mib=round(before / 1024, 1),
                peak_mib=round(peak / 1024, 1) if peak else None,
                extra_b_per_param=round((peak - before) * 1024 / n, 3) if peak else None,
                active_fraction=round(active / n, 3), method="VmHWM after clear_refs" if exact else "unavailable")


def run_masks(models=("llama-100m",), modes=MASK_MODES, repeats: int = 3) -> list[dict]:
    rows = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for m in models:
        for mode in modes:
            print(f"mask building memory: {m} / {mode} ...", flush=True)
            runs = []
            for _ in range(repeats):
                out = subprocess.run([sys.executable, "-m", "benchmarks.peak_memory", "--child-masks", m, mode],
                                     cwd=root, capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            runs.sort(key=lambda r: r["extra_b_per_param"])
            rows.append(dict(runs[len(runs) // 2], repeats=repeats,
                             spread_b_per_param=round(runs[-1]["extra_b_per_param"] - runs[0]["extra_b_per_param"], 3)))
    return rows


def masks_table(rows: list[dict]) -> str:
    lines = ["| model | params | masks built as | RSS before (2 gradients held) MiB | extra peak B/param (median) "
             "| spread B/param | active fraction |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['mode']} | {r['rss_before_mib']} | "
                     f"{r['extra_b_per_param']} | {r['spread_b_per_param']} | {r['active_fraction']} |")
    return "\n".join(lines)


def run_all(models=tuple(MODELS), optimizers=OPTIMIZERS, repeats: int = 3) -> list[dict]:
    rows = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for m in models:
        for o in optimizers:
            print(f"peak memory: {m} / {o} ...", flush=True)
            runs = []
            for _ in range(repeats):
                out = subprocess.run([sys.executable, "-m", "benchmarks.peak_memory", "--child", m, o], cwd=root,
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            # The median run: one run's heap layout moves the 96M model's peak by +-15 MiB, as
            # much as CPLAdamW's codes (24 MiB) themselves.
            runs.sort(key=lambda r: r["peak_mib"])
            row = dict(runs[len(runs) // 2], repeats=repeats,
                       peak_spread_mib=round(runs[-1]["peak_mib"] - runs[0]["peak_mib"], 1))
            rows.append(row)
        base = next(r for r in rows if r["model"] == m and r["optimizer"] == "adamw")
        for r in rows:
            if r["model"] == m:
                extra = r["peak_mib"] - base["peak_mib"]
                r["extra_mib"] = round(extra, 1)
                r["extra_b_per_param"] = round(extra * 2**20 / r["params"], 3)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | params | optimizer | peak RSS MiB (step, median run) | spread MiB | extra vs torch AdamW MiB "
             "| extra B/param |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['optimizer']} | {r['peak_mib']} | "
                     f"{r.get('peak_spread_mib', '')} | {r['extra_mib']} | {r['extra_b_per_param']} |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    ap.add_argument("--child-masks", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--masks", action="store_true", help="the extra peak memory of building CPL masks instead")
    ap.add_argument("--mask-modes", default=",".join(MASK_MODES))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if args.child_masks:
        print(json.dumps(child_masks(*args.child_masks)))
        return
    if args.masks:
        modes = tuple(args.mask_modes.split(","))
        print(masks_table(run_masks(models=tuple(args.models.split(",")) if args.models != ",".join(MODELS)
                                    else ("llama-100m",), modes=modes)))
        return
    print(table(run_all(models=tuple(args.models.split(",")))))


if __name__ == "__main__":
    main()
