"""The run folder: config, one JSON per completed (method, lr, seed) cell, aggregated JSON + CSV.

Never silently overwritten: an existing folder is only continued with resume=True, and only when
its stored configuration agrees on everything that decides results (methods, lrs and seeds may
grow) and whose --data file has the same content (sha256, stored in config.json). Cells are
written atomically when they complete, so an interrupted run loses at most the cell in progress and
a resume skips every completed cell.

A start that fails before its first cell completes (bad data, a bad --model, Ctrl-C or a kill
during pre-training) leaves only config.json and an empty cells/: that is no run, and the next
start with any options takes the folder over, rather than refusing it or needing --resume.
"""
from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

from .config import LabConfig
from .formats import data_sha256

CSV_COLUMNS = ("method", "lr", "seed", "epoch", "step", "learned", "n_inject", "forgotten", "forgotten_in",
               "forgotten_out", "n_mastered_in", "n_mastered_out", "xp_learned", "xp_forgotten",
               "loss", "mastered_loss", "wall_s", "peak_mem_mb", "state_mb", "frozen")


class RunError(RuntimeError):
    """An output folder that cannot be used as asked; the message names it and says why."""


class RunExists(RunError):
    pass


def make_dir(path: Path, what: str = "run folder") -> None:
    """mkdir -p, or RunError naming the folder and the problem: a file at or above it, no write
    permission (user mistakes, not bugs: no traceback)."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise RunError(f"{what} {path} is a file, not a folder" if p == path else
                               f"cannot create the {what} {path}: {p} is a file, not a folder")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create the {what} {path}: {e.strerror} ({e.filename})") from None
    if not os.access(path, os.W_OK | os.X_OK):  # else found only when the results are written
        raise RunError(f"{what} {path} is not writable")


# What a start leaves before its first cell completes (".tmp": config.json being written).
_START_FILES = {"config.json", "config.json.tmp", "cells"}


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
        # None for the synthetic facts; read first, so that a missing file creates no folder.
        self.data_sha256 = data_sha256(cfg.data) if cfg.data else None
        make_dir(self.path)
        try:
            self.cfg = self._check(cfg, resume)
            self.cells.mkdir(exist_ok=True)
            _write_json(self.path / "config.json", self.stored_config())
        except OSError as e:
            raise RunError(f"cannot use the run folder {self.path}: {e.strerror} ({e.filename})") from None

    def _holds_a_run(self) -> bool:
        """Anything but an empty folder or a start that failed before its first cell."""
        entries = {p.name for p in self.path.iterdir()}
        unstarted = entries <= _START_FILES and "config.json" in entries and \
            not any(self.cells.glob("*.json"))
        return bool(entries) and not unstarted

    def _check(self, cfg: LabConfig, resume: bool) -> LabConfig:
        """The configuration to store: cfg, or for a resume cfg with the grid of the stored run."""
        if not self._holds_a_run():
            return cfg
        stored = self.path / "config.json"
        if not resume:
            raise RunExists(f"{self.path} already holds a run; pass --resume to continue it "
                            "(completed cells are skipped) or choose another --out")
        if not stored.is_file():
            raise RunExists(f"{self.path} is not empty and holds no config.json: not a run folder")
        try:
            old_dict = json.loads(stored.read_text())
        except ValueError as e:
            raise RunExists(f"cannot resume {self.path}: {stored} is not valid JSON ({e})") from None
        old = LabConfig.from_dict(old_dict)
        diff = [k for k in LabConfig.RESULT_KEYS if getattr(old, k) != getattr(cfg, k)]
        if diff:
            raise RunExists(f"cannot resume {self.path}: its configuration differs in "
                            + ", ".join(f"{k} ({getattr(old, k)!r} -> {getattr(cfg, k)!r})" for k in diff))
        # Same path, other content would mix two data sets in one results.json. A folder from
        # before the hash was stored has none to compare: it is taken as it is.
        old_sha = old_dict.get("data_sha256")
        if old_sha and old_sha != self.data_sha256:
            raise RunExists(f"cannot resume {self.path}: --data {cfg.data} changed since the run "
                            f"started (sha256 {old_sha} then, {self.data_sha256} now); restore "
                            "that file or choose another --out")
        # The stored grid is the union of every grid run here; this invocation runs its own.
        merged = cfg.as_dict()
        for key in ("methods", "lrs", "seeds"):  # a resume may extend the grid, never shrink it
            merged[key] = list(dict.fromkeys(getattr(old, key) + getattr(cfg, key)))
        return LabConfig.from_dict(merged)

    def stored_config(self) -> dict:
        """config.json: the configuration and the content hash of its --data file."""
        return {**self.cfg.as_dict(), "data_sha256": self.data_sha256}

    def done(self, method: str, lr: float, seed: int) -> dict | None:
        f = self.cells / f"{cell_id(method, lr, seed)}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def save_cell(self, cell: dict) -> None:
        _write_json(self.cells / f"{cell_id(cell['method'], cell['lr'], cell['seed'])}.json", cell)

    def all_cells(self) -> list[dict]:
        return [json.loads(f.read_text()) for f in sorted(self.cells.glob("*.json"))]

    def write_results(self, meta: dict) -> tuple[Path, Path]:
        cells = self.all_cells()
        _write_json(self.path / "results.json", {"meta": meta, "config": self.stored_config(),
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
