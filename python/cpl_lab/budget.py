"""The budgeted metric: the most injected facts a method learns while forgetting stays within a
budget, over every (learning rate, evaluated epoch) point of its run.

This is the frontier a practitioner picks from: any lr of the grid, stopped after any evaluated
epoch. Each point is a setting, not a seed: learned and forgotten are first averaged over the
seeds that ran it, and a setting is eligible when its *mean* forgetting (in-set + out-of-set
mastered facts now wrong) is at most the budget. The budget is a fraction of the mastered facts
(`--forget-budget`, default 1%: 1.79 of 179 in the demo). Epoch 0 (before training: nothing
learned, nothing forgotten) is a point of every run, so a method that forgets too much at every
trained point still "meets" the budget by not training, with 0 learned.

Ties (the same mean learned) go to the point that forgets least, then to the earliest epoch (the
cheapest run), then to the smallest lr.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

BUDGETS = (0.0, 0.01, 0.05)  # always reported; --forget-budget adds its own


@dataclass(frozen=True)
class Point:
    """One (lr, epoch) setting of a method, averaged over its seeds."""
    method: str
    lr: float
    epoch: int
    learned: float
    forgotten: float
    forgotten_in: float
    forgotten_out: float
    seeds: int
    learned_min: float   # spread over seeds of the learned count at this setting
    learned_max: float
    step: int | None = None  # optimizer steps taken at this point, when the rows record it


def points(cells: list[dict]) -> dict[str, list[Point]]:
    """method -> its (lr, epoch) points, each the mean over the seeds that have it."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for cell in cells:
        for row in cell["rows"]:
            groups[(cell["method"], cell["lr"], row["epoch"])].append(row)
    out: dict[str, list[Point]] = defaultdict(list)
    for (method, lr, epoch), rows in sorted(groups.items()):
        mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
        learned = [r["learned"] for r in rows]
        out[method].append(Point(method, lr, epoch, mean("learned"), mean("forgotten"),
                                 mean("forgotten_in"), mean("forgotten_out"), len(rows),
                                 min(learned), max(learned), rows[0].get("step")))
    return dict(out)


def budget_facts(fraction: float, n_mastered: int) -> float:
    """The budget in facts: a fraction of the mastered facts (in-set + out-of-set)."""
    return fraction * n_mastered


def best_within(pts: list[Point], budget: float) -> Point | None:
    """The point learning most with mean forgetting <= budget (ties: least forgotten, earliest
    epoch, smallest lr); None when no point meets the budget."""
    ok = [p for p in pts if p.forgotten <= budget + 1e-9]
    if not ok:
        return None
    return min(ok, key=lambda p: (-p.learned, p.forgotten, p.epoch, p.lr))


def frontier(pts: list[Point]) -> list[Point]:
    """The Pareto frontier: points no other point beats on both learned (more) and forgotten
    (fewer), sorted by forgotten. The budgeted metric at any budget is read off this curve."""
    out = []
    for p in sorted(pts, key=lambda p: (p.forgotten, -p.learned, p.epoch, p.lr)):
        if not out or p.learned > out[-1].learned:
            out.append(p)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b; inf when only b is 0; None when either is missing or both are 0."""
    if a is None or b is None:
        return None
    if b == 0:
        return None if a == 0 else math.inf
    return a / b


def budget_rows(cells: list[dict], fraction: float, reference: str = "ft",
                extra: tuple[float, ...] = BUDGETS) -> list[dict]:
    """One row per method: its best point at `fraction` of the mastered facts, the ratio of its
    learned count to `reference`'s (fine-tuning) and to the best other baseline's, and the learned
    count at the other budgets."""
    from .runner import ORDER
    if not cells:
        return []
    r0 = cells[0]["rows"][0]
    n_mastered = r0["n_mastered_in"] + r0["n_mastered_out"]
    by_method = points(cells)
    fractions = sorted(set(extra) | {fraction})
    best = {m: {f: best_within(pts, budget_facts(f, n_mastered)) for f in fractions}
            for m, pts in by_method.items()}
    learned = lambda m, f: best[m][f].learned if best[m][f] else None  # noqa: E731
    rows = []
    for m in sorted(by_method, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m)):
        p = best[m][fraction]
        rows.append({
            "method": m, "budget": fraction, "budget_facts": budget_facts(fraction, n_mastered),
            "n_inject": r0["n_inject"], "n_mastered": n_mastered,
            "learned": p.learned if p else None, "forgotten": p.forgotten if p else None,
            "forgotten_in": p.forgotten_in if p else None,
            "forgotten_out": p.forgotten_out if p else None,
            "lr": p.lr if p else None, "epoch": p.epoch if p else None,
            "seeds": p.seeds if p else None,
            "learned_min": p.learned_min if p else None, "learned_max": p.learned_max if p else None,
            "vs_ft": ratio(learned(m, fraction), learned(reference, fraction)) if reference in best else None,
            "at": {f: learned(m, f) for f in fractions},
        })
    return rows


def json_safe(rows: list[dict]) -> list[dict]:
    """budget_rows for results.json: an infinite ratio (fine-tuning learned 0) as the string "inf",
    budgets as string keys."""
    fix = lambda x: "inf" if isinstance(x, float) and math.isinf(x) else x  # noqa: E731
    return [{k: ({f"{f:g}": fix(v) for f, v in x.items()} if isinstance(x, dict) else fix(x))
             for k, x in r.items()} for r in rows]


def best_baseline(rows: list[dict], method: str = "cpl",
                  exclude: tuple[str, ...] = ("cpl", "cpl-once", "cpl-masked-epoch", "random",
                                               "random-once", "cpl-mofo")) -> dict | None:
    """The baseline (not a CPL variant nor its random ablations) learning most at the budget."""
    cands = [r for r in rows if r["method"] not in exclude and r["learned"] is not None]
    return max(cands, key=lambda r: r["learned"]) if cands else None


def _fmt(x, spec="{:.1f}") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return spec.format(x)


def table(cells: list[dict], fraction: float) -> str:
    """The first table of `cpl inject`: learned within the forgetting budget, per method."""
    rows = budget_rows(cells, fraction)
    if not rows:
        return "(no results)"
    r0 = rows[0]
    others = [f for f in r0["at"] if f != fraction]
    header = ["method", "learned", "x ft", "lr", "epoch", "forgot", "in-set", "out-set",
              "seeds min-max"] + [f"@{f:.0%}" for f in others]
    body = []
    for r in rows:
        spread = "-" if r["learned_min"] is None else f"{r['learned_min']:g}-{r['learned_max']:g}"
        body.append([r["method"], _fmt(r["learned"]), _fmt(r["vs_ft"], "{:.2f}"),
                     "-" if r["lr"] is None or r["epoch"] == 0 else f"{r['lr']:g}",
                     _fmt(r["epoch"], "{}"), _fmt(r["forgotten"]), _fmt(r["forgotten_in"]),
                     _fmt(r["forgotten_out"]), spread] + [_fmt(r["at"][f]) for f in others])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cols: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cols, widths)))
    seeds = max(r["seeds"] or 0 for r in rows)
    lines = [f"learned within a forgetting budget of {fraction:.0%} of the {r0['n_mastered']} mastered "
             f"facts (<= {r0['budget_facts']:.2f} forgotten, mean of {seeds} seed(s)), best over every "
             f"lr and evaluated epoch; learned of {r0['n_inject']} injected; epoch 0 = do not train",
             line(header), line(["-" * w for w in widths])] + [line(b) for b in body]
    cpl = next((r for r in rows if r["method"] == "cpl"), None)
    base = best_baseline(rows)
    if cpl and base and cpl["learned"] is not None:
        rb = ratio(cpl["learned"], base["learned"])
        lines.append(f"cpl / best baseline ({base['method']}): {_fmt(rb, '{:.2f}')}; "
                     f"cpl / ft: {_fmt(cpl['vs_ft'], '{:.2f}')} "
                     "(the paper: CPL learns 1.20-1.48x the best of seven baselines)")
    return "\n".join(lines)
