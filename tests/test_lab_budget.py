"""The budgeted metric on hand-made trajectories: the most facts learned with forgetting within a
budget, over every (lr, epoch) point, mean over seeds; ties, a method that never meets the budget,
ratios to fine-tuning and to the best baseline."""
import math

import pytest

from cpl_lab import budget

N_IN, N_OUT, N_INJECT = 50, 50, 80  # 100 mastered facts: 1% = 1 fact, 5% = 5 facts


def cell(method, lr, traj, seed=0, epoch0=True):
    """traj: [(learned, forgotten_in, forgotten_out)] for epochs 1..n; epoch 0 (nothing learned,
    nothing forgotten) is prepended unless epoch0=False."""
    rows = [(0, 0, 0)] if epoch0 else []
    rows += traj
    first = 0 if epoch0 else 1
    return {"method": method, "lr": lr, "seed": seed, "rows": [
        {"epoch": first + e, "learned": l, "forgotten_in": fi, "forgotten_out": fo,
         "forgotten": fi + fo, "n_inject": N_INJECT, "n_mastered_in": N_IN, "n_mastered_out": N_OUT}
        for e, (l, fi, fo) in enumerate(rows)]}


def by_method(rows):
    return {r["method"]: r for r in rows}


def test_best_point_over_lrs_and_epochs():
    cells = [
        cell("ft", 1e-3, [(30, 1, 1), (60, 5, 5)]),          # forgets 2 already at epoch 1
        cell("ft", 1e-4, [(10, 0, 0), (20, 1, 0), (35, 2, 1)]),
        cell("cpl", 1e-3, [(40, 0, 1), (70, 0, 3), (80, 0, 8)]),
        cell("cpl", 1e-4, [(15, 0, 0), (25, 0, 0)]),
    ]
    rows = by_method(budget.budget_rows(cells, 0.01))
    assert rows["ft"]["budget_facts"] == pytest.approx(1.0)
    assert (rows["ft"]["learned"], rows["ft"]["lr"], rows["ft"]["epoch"]) == (20, 1e-4, 2)
    assert (rows["cpl"]["learned"], rows["cpl"]["lr"], rows["cpl"]["epoch"]) == (40, 1e-3, 1)
    assert rows["cpl"]["forgotten_out"] == 1 and rows["cpl"]["forgotten_in"] == 0
    assert rows["cpl"]["vs_ft"] == pytest.approx(2.0) and rows["ft"]["vs_ft"] == 1.0
    # the other budgets: 0 forgotten and 5 forgotten
    assert rows["cpl"]["at"] == {0.0: 25, 0.01: 40, 0.05: 70}
    assert rows["ft"]["at"] == {0.0: 10, 0.01: 20, 0.05: 35}


def test_ties_prefer_least_forgotten_then_earliest_epoch_then_smallest_lr():
    pts = budget.points([
        cell("m", 1e-3, [(30, 0, 1), (30, 0, 0), (30, 0, 0)]),  # 30 at epochs 1 (1 forgotten), 2, 3
        cell("m", 1e-4, [(20, 0, 0), (30, 0, 0)]),              # 30 at epoch 2, smaller lr
    ])["m"]
    best = budget.best_within(pts, 1.0)
    assert (best.learned, best.forgotten, best.epoch, best.lr) == (30, 0, 2, 1e-4)
    # the same learned with more forgetting loses even when earlier
    assert budget.best_within(pts, 1.0).forgotten == 0


def test_a_method_that_never_meets_the_budget():
    # With epoch 0 in its rows, not training meets any budget: 0 learned at epoch 0.
    cells = [cell("ft", 1e-3, [(50, 3, 3), (80, 9, 9)]), cell("cpl", 1e-3, [(40, 0, 1)])]
    rows = by_method(budget.budget_rows(cells, 0.01))
    assert (rows["ft"]["learned"], rows["ft"]["epoch"], rows["ft"]["forgotten"]) == (0, 0, 0)
    assert rows["cpl"]["vs_ft"] == math.inf  # ft learned nothing within the budget
    assert "inf" in budget.table(cells, 0.01)
    assert budget.json_safe(budget.budget_rows(cells, 0.01))[1]["vs_ft"] == "inf"
    # Without an epoch-0 row no point qualifies: no answer rather than a made-up 0.
    cells = [cell("ft", 1e-3, [(50, 3, 3)], epoch0=False), cell("cpl", 1e-3, [(40, 0, 1)])]
    rows = by_method(budget.budget_rows(cells, 0.01))
    assert rows["ft"]["learned"] is None and rows["ft"]["lr"] is None
    assert rows["cpl"]["vs_ft"] is None
    line = next(l for l in budget.table(cells, 0.01).splitlines() if l.startswith("ft "))
    assert " - " in line
    # neither learned anything: no ratio
    assert budget.ratio(0, 0) is None and budget.ratio(0, 5) == 0


def test_points_are_means_over_seeds_and_the_budget_applies_to_the_mean():
    cells = [cell("cpl", 1e-3, [(40, 0, 0), (60, 0, 1)], seed=0),
             cell("cpl", 1e-3, [(50, 0, 1), (70, 0, 2)], seed=1)]
    pts = budget.points(cells)["cpl"]
    assert [(p.epoch, p.learned, p.forgotten, p.seeds) for p in pts] == \
        [(0, 0, 0, 2), (1, 45, 0.5, 2), (2, 65, 1.5, 2)]
    row = budget.budget_rows(cells, 0.01)[0]
    assert (row["learned"], row["learned_min"], row["learned_max"]) == (45, 40, 50)
    assert budget.budget_rows(cells, 0.015)[0]["learned"] == 65  # mean 1.5 <= 1.5


def test_zero_budget_means_nothing_forgotten():
    cells = [cell("cpl", 1e-3, [(10, 0, 0), (20, 0, 1)])]
    assert budget.budget_rows(cells, 0.0)[0]["learned"] == 10


def test_frontier_is_pareto_and_sorted():
    pts = budget.points([cell("m", 1e-3, [(10, 0, 0), (30, 1, 1), (25, 1, 0), (50, 3, 3), (40, 4, 4)])])["m"]
    front = budget.frontier(pts)
    assert [(p.forgotten, p.learned) for p in front] == [(0, 10), (1, 25), (2, 30), (6, 50)]


def test_best_baseline_excludes_cpl_and_its_ablations():
    cells = [cell("ft", 1e-3, [(10, 0, 0)]), cell("cpl", 1e-3, [(60, 0, 0)]),
             cell("random", 1e-3, [(70, 0, 0)]), cell("replay", 1e-3, [(30, 0, 1)]),
             cell("ewc", 1e-3, [(20, 0, 0)])]
    rows = budget.budget_rows(cells, 0.01)
    assert budget.best_baseline(rows)["method"] == "replay"
    text = budget.table(cells, 0.01)
    assert text.splitlines()[0].startswith("learned within a forgetting budget of 1% of the 100")
    assert "cpl / best baseline (replay): 2.00; cpl / ft: 6.00" in text
