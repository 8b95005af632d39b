"""Running the grid: every (method, lr, seed) cell from the same pre-trained weights, with the same
injection batches in the same order, measured after every epoch (and once before training)."""
from __future__ import annotations

import copy
import time

import torch
from tqdm.auto import tqdm

from .lab import Lab
from .memory import PeakMemory
from .methods import REGISTRY, Context
from .runs import RunDir

# "random" matches the frozen fraction of the CPL cell with the same lr and seed, so CPL runs first.
ORDER = ("ft", "cpl", "cpl-once", "cpl-masked-epoch", "random", "random-once", "agem", "replay", "lora", "ewc",
         "surgery", "mofo", "cpl-mofo")


def run_cell(lab: Lab, method: str, lr: float, seed: int, frozen_target=None,
             progress: bool = True) -> dict:
    cfg = lab.cfg
    torch.manual_seed(seed)
    model = copy.deepcopy(lab.model)  # lab.model is never trained: every cell starts from it
    model.train()
    mem = PeakMemory(cfg.device)
    mem.reset()
    gen = torch.Generator().manual_seed(seed)
    ctx = Context(cfg, lr, seed, lab.inject, lab.mastered_in, torch.Generator().manual_seed(seed + 1),
                  frozen_target)
    sizes = {"n_inject": len(lab.split.inject), "n_mastered_in": len(lab.split.mastered_in),
             "n_mastered_out": len(lab.split.mastered_out)}
    key = {"method": method, "lr": lr, "seed": seed}

    evals = 0

    def row(epoch, loss, wall, frozen, impl, step=0):
        nonlocal evals
        # Held-out templates: every xp_every-th measurement, always the last one (and epoch 0).
        xp = epoch in (0, cfg.epochs) or (cfg.xp_every > 0 and evals % cfg.xp_every == 0)
        evals += 1
        m = lab.measure(impl.eval_model, heldout=xp) if impl else lab.measure_before()
        keys = m.pop("forgotten_keys")
        return {**key, "epoch": epoch, "step": step, **sizes, **m, "loss": loss, "wall_s": round(wall, 3),
                "peak_mem_mb": round(mem.peak_mb(), 1),
                "state_mb": round(impl.state_bytes() / 2**20, 4) if impl else 0.0,
                "frozen": frozen}, keys

    rows = [row(0, None, 0.0, 0.0, None)[0]]
    t0 = time.perf_counter()
    impl = REGISTRY[method](model, ctx)  # setup (cpl-once's gradients) counts as training time
    wall = time.perf_counter() - t0
    steps = -(-len(lab.inject) // cfg.batch_size) * cfg.epochs
    bar = tqdm(total=steps, desc=f"{method} lr={lr:g} seed={seed}", disable=not progress, leave=False)
    keys = []
    done = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        impl.start_epoch(epoch)
        total, n = 0.0, 0
        for batch in lab.inject.batches(cfg.batch_size, gen):
            total += impl.step(batch) * len(batch)
            n += len(batch)
            done += 1
            bar.update(1)
        wall += time.perf_counter() - t0
        frozen = impl.take_frozen()
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            r, keys = row(epoch, total / n, wall, frozen, impl, done)
            rows.append(r)
            bar.set_postfix(learned=r["learned"], forgot=r["forgotten"])
    bar.close()
    return {**key, "rows": rows, "forgotten_keys": keys, "memory": mem.kind}


def frozen_by_epoch(cell: dict | None) -> dict | None:
    if not cell:
        return None
    return {r["epoch"]: r["frozen"] for r in cell["rows"] if r["epoch"] > 0}


def run_grid(lab: Lab, run: RunDir, progress: bool = True, log=print) -> list[dict]:
    """Runs the grid asked for this time (lab.cfg: methods x lrs x seeds), skipping cells the run
    folder already holds. The folder's config.json records the union of every grid run in it."""
    cfg = lab.cfg
    methods = sorted(cfg.methods, key=ORDER.index)
    cells = [(m, lr, s) for lr in cfg.lrs for s in cfg.seeds for m in methods]
    out = []
    for method, lr, seed in cells:
        done = run.done(method, lr, seed)
        if done:
            log(f"skip {method} lr={lr:g} seed={seed}: already in {run.path}")
            out.append(done)
            continue
        target = frozen_by_epoch(run.done("cpl", lr, seed)) if method == "random" else None
        cell = run_cell(lab, method, lr, seed, target, progress)
        run.save_cell(cell)
        last = cell["rows"][-1]
        log(f"{method:>11} lr={lr:g} seed={seed}: learned {last['learned']}/{last['n_inject']}, "
            f"forgot {last['forgotten']} (in {last['forgotten_in']}, out {last['forgotten_out']}), "
            f"{last['wall_s']:.1f} s")
        out.append(cell)
    return out
