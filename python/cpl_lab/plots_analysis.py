"""PNG of `cpl analyze`: similarity of forgotten vs retained questions, conflict per layer."""
from __future__ import annotations

from pathlib import Path

from .plots import _plt


def plot_analysis(samples: list[dict], layers: list[dict], out: Path) -> Path:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    forgotten = [s["cos"] for s in samples if s["forgotten"]]
    kept = [s["cos"] for s in samples if not s["forgotten"]]
    lo = min(s["cos"] for s in samples)
    hi = max(s["cos"] for s in samples)
    bins = [lo + (hi - lo) * k / 20 for k in range(21)] if hi > lo else 10
    a.hist([kept, forgotten], bins=bins, label=["retained", "forgotten"], stacked=True)
    a.set_xlabel("cosine(mastered question gradient, mean injection gradient)")
    a.set_ylabel("mastered questions")
    a.set_title("similarity before injection vs forgotten by fine-tuning", fontsize=9)
    a.legend(fontsize=8)
    names = [l["name"] for l in layers]
    b.barh(names, [l["conflicting"] for l in layers], color="tab:red")
    b.set_xlabel("conflicting fraction (injection grad * mastered grad < 0)")
    b.set_xlim(0, 1)
    b.invert_yaxis()
    b.set_title("per layer", fontsize=9)
    fig.tight_layout()
    path = Path(out) / "analysis.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
