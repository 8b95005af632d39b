"""PNG plots of a run: learning/forgetting curves per method, learned vs forgotten across lrs."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .report import final_rows
from .runner import ORDER


def _color(method: str) -> str:
    return f"C{ORDER.index(method) % 10}"  # one colour per method in every plot


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
