"""What `cpl inject` and `cpl analyze` do once their options are parsed."""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from .config import LabConfig
from .runs import RunDir, RunExists, default_run_dir, make_dir


def _setup(cfg: LabConfig) -> None:
    torch.set_num_threads(cfg.threads)


def inject_command(cfg: LabConfig, args) -> int:
    from . import budget, plots
    from .lab import prepare
    from .report import table
    from .runner import run_grid

    t0 = time.perf_counter()
    _setup(cfg)
    out = Path(args.out) if args.out else default_run_dir(prefix="demo" if args.demo else "inject")
    run = RunDir(out, cfg, resume=args.resume)  # refuses an existing run before any work is done
    print(f"run folder: {run.path}")
    lab = prepare(cfg, args.cache_dir, progress=not args.no_progress)
    cells = run_grid(lab, run, progress=not args.no_progress)
    meta = {"lab": lab.summary(), "memory": cells[-1]["memory"] if cells else None,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "seconds": round(time.perf_counter() - t0, 1)}
    all_cells = run.all_cells()
    meta["budget"] = budget.json_safe(budget.budget_rows(all_cells, cfg.forget_budget))
    json_path, csv_path = run.write_results(meta)
    written = []
    if not args.no_plots:
        written = [plots.frontier(all_cells, run.path, cfg.forget_budget)] + \
            plots.curves(all_cells, run.path) + [plots.sweep(all_cells, run.path)]
    print()
    print(budget.table(all_cells, cfg.forget_budget))
    print()
    print(table(all_cells))
    print(f"\nmemory: {meta['memory']}; xp = held-out templates (cross-prompt)")
    print("results: " + ", ".join(str(p) for p in [json_path, csv_path, *written]))
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


def analyze_command(cfg: LabConfig, args) -> int:
    from .analyze import analyze
    _setup(cfg)
    out = Path(args.out) if args.out else default_run_dir(prefix="analyze")
    # The analysis files are only written at the end: a failed start leaves the folder empty.
    make_dir(out, "analysis folder")
    if any(out.iterdir()) and not args.resume:
        raise RunExists(f"{out} is not empty; choose another --out (or --resume to overwrite the "
                        "analysis files in it)")
    print(f"analysis folder: {out}")
    analyze(cfg, out, args.cache_dir, progress=not args.no_progress, plots=not args.no_plots)
    return 0
