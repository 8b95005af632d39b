"""The run folder: config, one JSON per completed (method, lr, seed) cell, aggregated JSON + CSV.

Never silently overwritten: an existing folder is only continued with resume=True, and only when
its stored configuration agrees on everything that decides results (methods, lrs and seeds may
grow). Cells are written atomically when they complete, so an interrupted run loses at most the
cell in progress and a resume skips every completed cell.
"""
from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

from .config import LabConfig

CSV_COLUMNS = ("method", "lr", "seed", "epoch", "learned", "n_inject", "forgotten", "forgotten_in",
               "forgotten_out", "n_mastered_in", "n_mastered_out", "xp_learned", "xp_forgotten",
               "loss", "mastered_loss", "wall_s", "peak_mem_mb", "state_mb", "frozen")


class RunExists(RuntimeError):
    pass


def cell_id(method: str, lr: float, seed: int) -> str:
    return f"{method}_lr{lr:g}_seed{seed}"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def default_run_dir(root="runs", prefix="inject") -> Path:
    base = Path(root) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 2
    while path.exists():
        path, k = Path(f"{base}-{k}"), k + 1
    return path


class RunDir:
    def __init__(self, path, cfg: LabConfig, resume: bool = False):
        self.path = Path(path)
        self.cells = self.path / "cells"
        stored = self.path / "config.json"
        if self.path.exists() and any(self.path.iterdir()):
            if not resume:
                raise RunExists(f"{self.path} already holds a run; pass --resume to continue it "
                                "(completed cells are skipped) or choose another --out")
            if not stored.is_file():
                raise RunExists(f"{self.path} is not empty and holds no config.json: not a run folder")
            old = LabConfig.from_dict(json.loads(stored.read_text()))
            diff = [k for k in LabConfig.RESULT_KEYS if getattr(old, k) != getattr(cfg, k)]
            if diff:
                raise RunExists(f"cannot resume {self.path}: its configuration differs in "
                                + ", ".join(f"{k} ({getattr(old, k)!r} -> {getattr(cfg, k)!r})" for k in diff))
            # The stored grid is the union of every grid run here; this invocation runs its own.
            merged = cfg.as_dict()
            for key in ("methods", "lrs", "seeds"):  # a resume may extend the grid, never shrink it
                merged[key] = list(dict.fromkeys(getattr(old, key) + getattr(cfg, key)))
            cfg = LabConfig.from_dict(merged)
        self.cells.mkdir(parents=True, exist_ok=True)
        _write_json(stored, cfg.as_dict())
        self.cfg = cfg

    def done(self, method: str, lr: float, seed: int) -> dict | None:
        f = self.cells / f"{cell_id(method, lr, seed)}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def save_cell(self, cell: dict) -> None:
        _write_json(self.cells / f"{cell_id(cell['method'], cell['lr'], cell['seed'])}.json", cell)

    def all_cells(self) -> list[dict]:
        return [json.loads(f.read_text()) for f in sorted(self.cells.glob("*.json"))]

    def write_results(self, meta: dict) -> tuple[Path, Path]:
        cells = self.all_cells()
        _write_json(self.path / "results.json", {"meta": meta, "config": self.cfg.as_dict(),
                                                 "cells": cells})
        csv_path = self.path / "results.csv"
        with open(csv_path.with_name("results.csv.tmp"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            for cell in cells:
                for row in cell["rows"]:
                    w.writerow(row)
        os.replace(csv_path.with_name("results.csv.tmp"), csv_path)
        return self.path / "results.json", csv_path
