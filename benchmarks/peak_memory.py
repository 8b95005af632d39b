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

RSS includes what glibc keeps of freed heap pages, which moves the 96M model's peak by 6-50 MiB
from run to run and hides savings made by freeing early. So each subprocess also runs one step
under torch's profiler and reports the allocator's view (benchmarks/live_memory.py): the peak of
live CPU tensor bytes, exact and deterministic, the phase and autograd node at that peak, and the
bytes autograd saved in the forward (the activations). `--malloc returned` runs the subprocesses
with a fixed glibc mmap threshold, so RSS follows the live tensors; `--checkpointing` recomputes
every decoder layer in the backward (HF gradient checkpointing, non-reentrant), for every case.

Cases (CASES): the reference is set once before the warm-up ("per epoch", as the paper) or rebuilt
from the mastered batch inside every training step ("per step", the lab's recipe: the measured
step then holds two backwards). "-bwd" cases step inside backward (cpl_kernels.in_backward): the
per-step reference is packed by the hooks of the mastered backward and every parameter steps in
the injection backward's hooks, freeing each gradient at once. After the measured step, `--steps`
more training steps are timed (median); step time is reported as a ratio to AdamW's and, for a
"-bwd" case, to the same optimizer and schedule stepping normally.

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
# case -> (optimizer, reference schedule, steps in backward)
CASES = {
    "adamw": ("adamw", None, False),
    "paper": ("paper", "epoch", False),
    "cpladamw": ("cpladamw", "epoch", False),
    "cpladamw-bwd": ("cpladamw", "epoch", True),
    "cpladamw-step-ref": ("cpladamw", "step", False),
    "cpladamw-step-ref-bwd": ("cpladamw", "step", True),
    "masked50": ("masked50", None, False),
    "masked50-bwd": ("masked50", None, True),
    # 8-bit blockwise m, v (issue 14): the state falls from 8 to ~2 B/param.
    "cpladamw8bit": ("cpladamw8bit", "epoch", False),
    "cpladamw8bit-bwd": ("cpladamw8bit", "epoch", True),
    "cpladamw8bit-step-ref": ("cpladamw8bit", "step", False),
    "cpladamw8bit-step-ref-bwd": ("cpladamw8bit", "step", True),
}
OPTIMIZERS = tuple(CASES)  # the cases, by their historical name (benchmarks/report.py)
TIMED_STEPS = 4


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


def child(model_name: str, case: str, timed_steps: int = TIMED_STEPS, checkpointing: bool = False) -> dict:
    import resource
    import statistics
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpl_kernels import build_reference, in_backward
    from cpl_kernels.optim import CPLAdamW, CPLAdamW8bit, MaskedAdamW
    from .live_memory import LiveTimeline, phase, saved_activation_bytes
    from .paper_style import PaperStyleCPLAdamW

    optimizer, schedule, inside = CASES[case]
    torch.set_num_threads(2)
    torch.manual_seed(0)
    spec = dict(MODELS[model_name])
    batch, seq = spec.pop("batch"), spec.pop("seq")
    model = LlamaForCausalLM(LlamaConfig(**spec, max_position_embeddings=seq))
    if checkpointing:  # recompute each decoder layer in the backward: only its input is kept
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    n = sum(p.numel() for p in model.parameters())
    params = list(model.parameters())
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    elif optimizer == "paper":
        opt = PaperStyleCPLAdamW(params, lr=1e-4)
    elif optimizer == "masked50":
        gen = torch.Generator().manual_seed(2)
        opt = MaskedAdamW(params, masks=[torch.rand(p.shape, generator=gen) < 0.5 for p in params], lr=1e-4)
    elif optimizer == "cpladamw8bit":
        opt = CPLAdamW8bit(params, lr=1e-4)
    else:
        opt = CPLAdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    mastered = torch.randint(0, spec["vocab_size"], (batch, seq), generator=gen)
    inject = torch.randint(0, spec["vocab_size"], (batch, seq), generator=gen)

    def loss_fn(m, ids):
        return m(input_ids=ids, labels=ids).loss

    # The mastered backward runs for every case, AdamW included, so the heaps have seen the
    # same allocations (skipping it for AdamW made CPLAdamW look 50 MiB heavier on the 96M model).
    loss_fn(model, mastered).backward()
    if schedule == "epoch":  # the mastered reference, once (as the paper: per epoch)
        opt.set_reference() if optimizer == "paper" else opt.set_reference_from_grads()
    elif optimizer.startswith("cpladamw"):
        opt.clear_reference()  # rebuilt inside every step below
    opt.zero_grad(set_to_none=True)
    attached = in_backward(opt) if inside else None
    activations = []

    def train_step(count_activations: bool = False):
        if schedule == "step":
            with phase("reference"):
                build_reference(opt, model, [mastered], loss_fn)  # packs in the hooks when attached
        with phase("forward"):
            if count_activations:
                loss, saved = saved_activation_bytes(lambda: loss_fn(model, inject))
                activations.append(saved)
            else:
                loss = loss_fn(model, inject)
        with phase("backward"):
            loss.backward()
        del loss
        if attached is None:
            with phase("step"):
                opt.step()
                opt.zero_grad(set_to_none=True)

    train_step()  # warm-up: optimizer state allocated
    before = _rss_kib("VmRSS")
    exact = _reset_peak()
    train_step()
    peak = _rss_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # The allocator's view (benchmarks/live_memory.py), in a step of its own after the RSS one:
    # the profiler's records would count in RSS.
    timeline = LiveTimeline()
    with timeline.record():
        train_step(count_activations=True)
    live = timeline.summary()
    del timeline
    times = []
    for _ in range(timed_steps):
        t0 = time.perf_counter()
        train_step()
        times.append(time.perf_counter() - t0)
    return dict(model=model_name, optimizer=case, checkpointing=checkpointing, params=n,
                rss_before_mib=round(before / 1024, 1), peak_mib=round(peak / 1024, 1),
                live_start_mib=live["start_mib"], live_peak_mib=live["peak_mib"], live_end_mib=live["end_mib"],
                peak_phase=live["peak_phase"], peak_node=live["peak_node"], peak_op=live["peak_op"],
                activations_mib=round(activations[0] / 2**20, 1), phases=json.dumps(live["phases"]),
                step_ms=round(1e3 * statistics.median(times), 1) if times else None,
                method="VmHWM after clear_refs" if exact else "ru_maxrss",
                malloc=" ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ) or "glibc default")


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


# --malloc returned: glibc settings that give freed tensors back to the OS at once. A fixed
# threshold (setting either variable turns off glibc's dynamic one, which rises to the largest
# block freed, up to 32 MiB) puts every allocation above 64 KiB in its own mmap, unmapped on free,
# so RSS follows the live tensors instead of the heap's high-water mark.
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
MALLOC_MODES = {"default": {}, "returned": {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}}
# measured value -> the row keys derived from it: the peak RSS and the peak of live tensor bytes
MEASURES = {"peak_mib": ("extra_mib", "extra_b_per_param", "spread_b_per_param", "peak_spread_mib"),
            "live_peak_mib": ("live_extra_mib", "live_extra_b_per_param", "live_spread_b_per_param",
                              "live_spread_mib")}


def _child_run(model: str, case: str, timed_steps: int, checkpointing: bool, malloc: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    env.update(MALLOC_MODES[malloc])
    cmd = [sys.executable, "-m", "benchmarks.peak_memory", "--child", model, case, "--steps", str(timed_steps)]
    if checkpointing:
        cmd.append("--checkpointing")
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"peak_memory child {model}/{case} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_all(models=tuple(MODELS), optimizers=OPTIMIZERS, repeats: int = 3, timed_steps: int = TIMED_STEPS,
            checkpointing: bool = False, malloc: str = "default") -> list[dict]:
    rows = []
    for m in models:
        for o in optimizers:
            print(f"peak memory: {m} / {o} ...", flush=True)
            runs = [_child_run(m, o, timed_steps, checkpointing, malloc) for _ in range(repeats)]
            # The median run of each measure: one run's heap layout moves the 96M model's peak
            # RSS by +-15 MiB, as much as CPLAdamW's codes (24 MiB) themselves.
            row = dict(runs[0], repeats=repeats)
            for key, (_, _, _, spread) in MEASURES.items():
                values = sorted(r[key] for r in runs)
                row[key] = values[len(values) // 2]
                row[spread] = round(values[-1] - values[0], 1)
            row["peak_runs_mib"] = " ".join(str(r["peak_mib"]) for r in runs)
            steps = sorted(r["step_ms"] for r in runs if r.get("step_ms") is not None)
            row["step_ms"] = steps[len(steps) // 2] if steps else None
            rows.append(row)
        mine = [r for r in rows if r["model"] == m]
        base = next((r for r in mine if r["optimizer"] == "adamw"), None)
        for r in mine:
            if base is not None:
                for key, (extra, per_param, spread_pp, spread) in MEASURES.items():
                    diff = r[key] - base[key]
                    r[extra] = round(diff, 1)
                    r[per_param] = round(diff * 2**20 / r["params"], 2)
                    r[spread_pp] = round(r[spread] * 2**20 / r["params"], 2)
                r["time_vs_adamw"] = _ratio(r["step_ms"], base["step_ms"])
            normal = next((q for q in mine if q["optimizer"] == r["optimizer"].removesuffix("-bwd")), None)
            if r["optimizer"].endswith("-bwd") and normal is not None:
                r["time_vs_normal"] = _ratio(r["step_ms"], normal["step_ms"])
                r["peak_vs_normal_b_per_param"] = round((r["peak_mib"] - normal["peak_mib"]) * 2**20 / r["params"], 2)
                r["live_vs_normal_b_per_param"] = round((r["live_peak_mib"] - normal["live_peak_mib"]) * 2**20
                                                        / r["params"], 2)
    return rows


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def table(rows: list[dict]) -> str:
    lines = ["| model | params | case | ckpt | peak RSS MiB (median) | RSS vs AdamW B/param (spread) | "
             "peak live tensors MiB | live vs AdamW B/param | peak at (phase / autograd node) | saved activations MiB "
             "| step ms | time vs AdamW | in backward vs normal: time, RSS, live B/param |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = ""
        if "time_vs_normal" in r:
            time_vs = f"{r['time_vs_normal']}x" if r["time_vs_normal"] is not None else "not timed"
            vs = f"{time_vs}, {r['peak_vs_normal_b_per_param']:+}, {r['live_vs_normal_b_per_param']:+}"
        at = f"{r['peak_phase']} / {r['peak_node'] or r['peak_op']}"
        lines.append(f"| {r['model']} | {r['params']:,} | {r['optimizer']} | {'yes' if r['checkpointing'] else 'no'} | "
                     f"{r['peak_mib']} | {r.get('extra_b_per_param', '')} ({r.get('spread_b_per_param', '')}) | "
                     f"{r['live_peak_mib']} | {r.get('live_extra_b_per_param', '')} | {at} | {r['activations_mib']} | "
                     f"{r.get('step_ms', '')} | {r.get('time_vs_adamw', '')} | {vs} |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))  # rows differ: "-bwd" rows have more
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "CASE"), help=argparse.SUPPRESS)
    ap.add_argument("--child-masks", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per case (the median is kept)")
    ap.add_argument("--steps", type=int, default=TIMED_STEPS, help="timed training steps per subprocess")
    ap.add_argument("--checkpointing", action="store_true",
                    help="activation checkpointing of every decoder layer (HF gradient_checkpointing_enable, "
                         "non-reentrant), for every case")
    ap.add_argument("--malloc", choices=list(MALLOC_MODES), default="default",
                    help="glibc malloc settings of the subprocesses: 'returned' unmaps every freed block "
                         "above 64 KiB, so peak RSS follows the live tensors")
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    ap.add_argument("--masks", action="store_true", help="the extra peak memory of building CPL masks instead")
    ap.add_argument("--mask-modes", default=",".join(MASK_MODES))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, timed_steps=args.steps, checkpointing=args.checkpointing)))
        return
    if args.child_masks:
        print(json.dumps(child_masks(*args.child_masks)))
        return
    if args.masks:
        modes = tuple(args.mask_modes.split(","))
        print(masks_table(run_masks(models=tuple(args.models.split(",")) if args.models != ",".join(MODELS)
                                    else ("llama-100m",), modes=modes, repeats=args.repeats)))
        return
    cases = tuple(args.cases.split(","))
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    rows = run_all(models=tuple(args.models.split(",")), optimizers=cases, repeats=args.repeats,
                   timed_steps=args.steps, checkpointing=args.checkpointing, malloc=args.malloc)
    print(table(rows), flush=True)
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
