"""Training-step time with steps inside backward vs the same optimizer stepping normally, measured
side by side: `python -m benchmarks.step_in_backward [--model llama-100m] [--rounds 7]`.

Why a separate script: benchmarks/peak_memory.py times each case in its own subprocess, minutes
apart, and on a shared machine the load moves between them by more than the effect measured. Here
every case is a copy of the same model in one process, and each round runs one training step
(forward, backward(s), step) of every case in turn, so a burst of load hits all cases alike; the
report is the median over rounds of each case's time and of its ratio to torch AdamW(fused=True)
and to its own normal-step twin in the same round.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

from .peak_memory import MODELS

# case -> (optimizer, per-step reference, in backward)
CASES = {
    "adamw": ("adamw", False, False),
    "cpladamw": ("cpladamw", False, False),
    "cpladamw-bwd": ("cpladamw", False, True),
    "cpladamw-step-ref": ("cpladamw", True, False),
    "cpladamw-step-ref-bwd": ("cpladamw", True, True),
    "masked50": ("masked50", False, False),
    "masked50-bwd": ("masked50", False, True),
}


def build(model_name: str, cases, threads: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpl_kernels import build_reference, in_backward
    from cpl_kernels.optim import CPLAdamW, MaskedAdamW

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = dict(MODELS[model_name])
    batch, seq = spec.pop("batch"), spec.pop("seq")
    base = LlamaForCausalLM(LlamaConfig(**spec, max_position_embeddings=seq))
    gen = torch.Generator().manual_seed(1)
    mastered = torch.randint(0, spec["vocab_size"], (batch, seq), generator=gen)
    inject = torch.randint(0, spec["vocab_size"], (batch, seq), generator=gen)

    def loss_fn(m, ids):
        return m(input_ids=ids, labels=ids).loss

    steps = {}
    for case in cases:
        optimizer, step_ref, inside = CASES[case]
        model = copy.deepcopy(base)
        params = list(model.parameters())
        if optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        elif optimizer == "masked50":
            g = torch.Generator().manual_seed(2)
            opt = MaskedAdamW(params, masks=[torch.rand(p.shape, generator=g) < 0.5 for p in params], lr=1e-4)
        else:
            opt = CPLAdamW(params, lr=1e-4)
            if not step_ref:  # a reference set once (per epoch)
                loss_fn(model, mastered).backward()
                opt.set_reference_from_grads()
                opt.zero_grad(set_to_none=True)
        attached = in_backward(opt) if inside else None

        def step(model=model, opt=opt, step_ref=step_ref, attached=attached):
            if step_ref:
                build_reference(opt, model, [mastered], loss_fn)
            loss_fn(model, inject).backward()
            if attached is None:
                opt.step()
                opt.zero_grad(set_to_none=True)

        step()  # warm-up: state allocated
        steps[case] = step
    return steps


def measure(model_name: str, cases, rounds: int, threads: int) -> dict:
    steps = build(model_name, cases, threads)
    # Wall time is what the target is about; the process's CPU time (all its threads) is what the
    # hooks add to the work, and on a shared machine it moves far less with other jobs' load.
    times = {c: [] for c in cases}
    cpu = {c: [] for c in cases}
    for _ in range(rounds):
        for case, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times[case].append(time.perf_counter() - t0)
            cpu[case].append(time.process_time() - c0)
    out = {}
    for case in cases:
        row = {"ms": 1e3 * statistics.median(times[case]), "cpu_ms": 1e3 * statistics.median(cpu[case])}
        if "adamw" in times:
            row["vs_adamw"] = statistics.median(a / b for a, b in zip(times[case], times["adamw"]))
        twin = case.removesuffix("-bwd")
        if case.endswith("-bwd") and twin in times:
            ratios = sorted(a / b for a, b in zip(times[case], times[twin]))
            row["vs_normal"] = statistics.median(ratios)
            row["vs_normal_range"] = (ratios[0], ratios[-1])
            cpu_ratios = sorted(a / b for a, b in zip(cpu[case], cpu[twin]))
            row["cpu_vs_normal"] = statistics.median(cpu_ratios)
            row["cpu_vs_normal_range"] = (cpu_ratios[0], cpu_ratios[-1])
        out[case] = row
    return out


def table(model_name: str, rows: dict, rounds: int) -> str:
    lines = [f"{model_name}, median of {rounds} interleaved rounds", "",
             "| case | step ms | CPU ms | x torch AdamW fused | in backward / normal, wall (min-max over rounds) "
             "| in backward / normal, process CPU time (min-max) |",
             "|---|---|---|---|---|---|"]
    for case, r in rows.items():
        vs = (f"{r['vs_normal']:.3f} ({r['vs_normal_range'][0]:.2f}-{r['vs_normal_range'][1]:.2f})"
              if "vs_normal" in r else "")
        vs_cpu = (f"{r['cpu_vs_normal']:.3f} ({r['cpu_vs_normal_range'][0]:.2f}-{r['cpu_vs_normal_range'][1]:.2f})"
                  if "cpu_vs_normal" in r else "")
        lines.append(f"| {case} | {r['ms']:.0f} | {r['cpu_ms']:.0f} | {r.get('vs_adamw', float('nan')):.3f} | {vs} | {vs_cpu} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-100m", choices=list(MODELS))
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cases = tuple(args.cases.split(","))
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = measure(args.model, cases, args.rounds, args.threads)
    print(table(args.model, rows, args.rounds))
    if load is not None:  # the machine's state beside the figure (1-minute load average, before / after)
        print(f"load average (1 min): {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
