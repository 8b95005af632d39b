"""PNG plots of a run: learning/forgetting curves per method, learned vs forgotten across lrs."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .report import final_rows
from .runner import ORDER


def _color(method: str) -> str:
    i = ORDER.index(method)  # one colour per method in every plot; past the 10 default colours:
    return f"C{i}" if i < 10 else ("black", "darkgoldenrod", "magenta", "teal")[(i - 10) % 4]


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    return plt


def _mean_curves(cells, lr):
    """method -> (epochs, {key: mean over seeds per epoch})."""
    by_method = defaultdict(list)
    for c in cells:
        if c["lr"] == lr:
            by_method[c["method"]].append(c["rows"])
    out = {}
    for method, runs in by_method.items():
        epochs = [r["epoch"] for r in runs[0]]
        out[method] = (epochs, {k: [sum(run[i][k] or 0 for run in runs) / len(runs)
                                    for i in range(len(epochs))]
                                for k in ("learned", "forgotten_in", "forgotten_out", "xp_learned",
                                          "xp_forgotten")})
    return out


def curves(cells: list[dict], path: Path) -> list[Path]:
    """One PNG per learning rate: learned, forgotten in-set, forgotten out-of-set per epoch."""
    plt = _plt()
    written = []
    for lr in sorted({c["lr"] for c in cells}):
        data = _mean_curves(cells, lr)
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for method, (epochs, ys) in sorted(data.items(), key=lambda kv: ORDER.index(kv[0])):
            for ax, key in zip(axes, ("learned", "forgotten_in", "forgotten_out")):
                ax.plot(epochs, ys[key], marker=".", label=method, color=_color(method))
        r = cells[0]["rows"][0]
        titles = (f"learned (of {r['n_inject']} injected)",
                  f"forgotten, in-set (of {r['n_mastered_in']}, seen by the reference)",
                  f"forgotten, out-of-set (of {r['n_mastered_out']}, never seen)")
        for ax, title in zip(axes, titles):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"knowledge injection, lr={lr:g}", fontsize=10)
        fig.tight_layout()
        out = Path(path) / f"curves_lr{lr:g}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def sweep(cells: list[dict], path: Path) -> Path:
    """Learned vs forgotten (last epoch, mean over seeds), one line per method through its lrs."""
    plt = _plt()
    rows = final_rows(cells)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["lr"], r["forgotten"], r["learned"]) for r in rows if r["method"] == method)
        ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=method,
                color=_color(method))
        for lr, x, y in pts:
            ax.annotate(f"{lr:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("forgotten (mastered questions now wrong)")
    ax.set_ylabel("learned (injected questions now right)")
    ax.set_title("learning-rate sweep: up and to the left is better", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path) / "sweep.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


_LR_MARKERS = "os^Dvp*hX"


def frontier(cells: list[dict], path: Path, fraction: float) -> Path:
    """Learned vs forgotten at every (lr, epoch) point, mean over seeds: per method, a thin line per
    lr through its epochs (marker = lr) and a bold line along its frontier (the most learned for at
    most that much forgotten); the budget as a vertical line, each method's pick at it as a star.
    The x axis is linear up to 5 forgotten facts and logarithmic beyond, so the budget is visible."""
    from .budget import best_within, budget_facts, frontier as pareto, points
    plt = _plt()
    by_method = points(cells)
    r0 = cells[0]["rows"][0]
    n_mastered = r0["n_mastered_in"] + r0["n_mastered_out"]
    budget = budget_facts(fraction, n_mastered)
    lrs = sorted({c["lr"] for c in cells})
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for method in sorted(by_method, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER)):
        pts, color = by_method[method], _color(method)
        for i, lr in enumerate(lrs):
            traj = sorted((p for p in pts if p.lr == lr), key=lambda p: p.epoch)
            if traj:
                ax.plot([p.forgotten for p in traj], [p.learned for p in traj], color=color,
                        alpha=0.3, lw=0.8, marker=_LR_MARKERS[i % len(_LR_MARKERS)], ms=3.5)
        front = pareto(pts)
        xs, ys = [], []
        for p in front:  # a step line: learned stays until the next frontier point
            if xs:
                xs.append(p.forgotten)
                ys.append(ys[-1])
            xs.append(p.forgotten)
            ys.append(p.learned)
        best = best_within(pts, budget)
        label = method if best is None else (
            f"{method}: {best.learned:.1f}"
            + (" (do not train)" if best.epoch == 0 else f" (lr {best.lr:g}, epoch {best.epoch})"))
        ax.plot(xs, ys, color=color, lw=2.2, label=label)
        if best is not None:
            ax.plot([best.forgotten], [best.learned], marker="*", ms=14, color=color, mec="black", mew=0.6)
    ax.axvline(budget, color="black", ls="--", lw=1)
    ax.text(budget, 1.0, f" budget {fraction:.0%}\n ({budget:.2f} facts)", transform=ax.get_xaxis_transform(),
            fontsize=8, va="top")
    ax.set_xscale("symlog", linthresh=5, linscale=1.5)
    ax.set_xlim(left=-0.3)
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter
    top = max(p.forgotten for pts in by_method.values() for p in pts)
    ax.xaxis.set_major_locator(FixedLocator([t for t in (0, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500)
                                             if t <= max(top, 5) * 1.2]))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"forgotten (of {n_mastered} mastered facts; linear to 5, log beyond)")
    ax.set_ylabel(f"learned (of {r0['n_inject']} injected facts)")
    seeds = max(p.seeds for pts in by_method.values() for p in pts)
    ax.set_title(f"every lr x epoch, mean of {seeds} seed(s): up and left is better\n"
                 "bold: frontier; thin: one lr through its epochs (marker = lr: "
                 + ", ".join(f"{_LR_MARKERS[i % len(_LR_MARKERS)]} {lr:g}" for i, lr in enumerate(lrs))
                 + ")", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
              title=f"learned within the budget", title_fontsize=8)
    fig.tight_layout()
    out = Path(path) / "frontier.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
