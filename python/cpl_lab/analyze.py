"""`cpl analyze`: does a mastered question's gradient similarity to the injection set predict
whether fine-tuning forgets it, and where (which layers) do the two gradients conflict?

Per mastered question q: cos(grad_q, mean injection gradient) at the pre-trained weights. Then a
plain fine-tuning cell (the same injection options as `cpl inject`) decides which are forgotten.
Per layer: cpl_kernels.analysis over (mean injection gradient, mean mastered in-set gradient):
the conflicting fraction (elements with a*b < 0) and the positive/negative parts of the dot.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cpl_kernels import analysis

from .config import LabConfig
from .lab import prepare
from .methods.static import mean_grads
from .runner import run_cell

BINS = 5


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1).float() for g in grads])


def per_item_similarity(lab, params, inject_flat, progress) -> list[dict]:
    out = []
    in_set = set(lab.split.mastered_in)
    for i in tqdm(lab.mastered, desc="per-question gradients", disable=not progress, leave=False):
        rows = (lab.eval_train.item == i).nonzero().flatten()
        g = _flat(mean_grads(lab.model, params, lab.eval_train.rows(rows), len(rows)))
        dot = float(g @ inject_flat)
        cos = dot / max(float(g.norm() * inject_flat.norm()), 1e-30)
        out.append({"key": lab.items[i].key, "in_set": i in in_set, "cos": cos, "dot": dot})
    return out


def auc(pos: list[float], neg: list[float]) -> float | None:
    """P(a forgotten question's similarity < a retained one's), ties counted half."""
    if not pos or not neg:
        return None
    wins = sum((p < n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def similarity_table(samples: list[dict]) -> tuple[str, list[dict]]:
    ordered = sorted(samples, key=lambda s: s["cos"])
    bins = []
    for b in range(BINS):
        part = ordered[b * len(ordered) // BINS:(b + 1) * len(ordered) // BINS]
        if part:
            bins.append({"bin": b + 1, "cos_from": part[0]["cos"], "cos_to": part[-1]["cos"],
                         "n": len(part), "forgotten": sum(s["forgotten"] for s in part)})
    lines = ["cosine(question grad, injection grad)   n  forgotten",
             "-------------------------------------  ---  ---------"]
    for b in bins:
        lines.append(f"  bin {b['bin']}: {b['cos_from']:+.3f} .. {b['cos_to']:+.3f}        "
                     f"{b['n']:>3}  {b['forgotten']:>3} ({b['forgotten'] / b['n']:.0%})")
    return "\n".join(lines), bins


def analyze(cfg: LabConfig, out: Path, cache_dir=None, progress=True, plots=True) -> dict:
    lab = prepare(cfg, cache_dir, progress=progress)
    model = lab.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    bs = cfg.ref_batch
    g_inject = mean_grads(model, params, lab.inject, bs)
    g_mastered = mean_grads(model, params, lab.mastered_in, bs)
    samples = per_item_similarity(lab, params, _flat(g_inject), progress)

    # The largest rate of the grid: the fine-tuning run that forgets most, so the most labels.
    lr, seed = max(cfg.lrs), cfg.seeds[0]
    ft = run_cell(lab, "ft", lr, seed, progress=progress)
    forgotten = set(ft["forgotten_keys"])
    for s in samples:
        s["forgotten"] = s["key"] in forgotten
    text, bins = similarity_table(samples)
    score = auc([s["cos"] for s in samples if s["forgotten"]],
                [s["cos"] for s in samples if not s["forgotten"]])

    rows = analysis.tensor_stats(model, dict(zip(names, g_inject)), dict(zip(names, g_mastered)))
    layers = analysis.layer_stats(rows)
    print(f"\nplain fine-tuning (lr={lr:g}, {cfg.epochs} epochs) forgot {len(forgotten)} of "
          f"{len(samples)} mastered questions\n{text}")
    print("AUC (forgotten questions have the lower similarity): "
          + ("n/a" if score is None else f"{score:.3f}  (0.5 = no signal)"))
    print("\nper layer: injection gradient vs mastered in-set gradient\n" + analysis.format_table(layers))

    with open(out / "similarity.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["key", "in_set", "cos", "dot", "forgotten"])
        w.writeheader()
        w.writerows(samples)
    layer_dicts = [{"name": r.name, "numel": r.numel, "conflicting": r.conflicting,
                    "collaborative": r.collaborative, "zero": r.zero, "pos_sum": r.pos_sum,
                    "neg_sum": r.neg_sum, "dot": r.dot} for r in layers]
    with open(out / "layers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(layer_dicts[0]))
        w.writeheader()
        w.writerows(layer_dicts)
    result = {"config": cfg.as_dict(), "lab": lab.summary(), "forgotten": len(forgotten),
              "auc": score, "bins": bins, "layers": layer_dicts}
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    if plots:
        from .plots_analysis import plot_analysis
        plot_analysis(samples, layer_dicts, out)
    print(f"\nresults: {out}")
    return result
