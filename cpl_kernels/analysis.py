"""Parameter-wise contribution statistics of two gradients (docs/design.md section 1): per tensor and
per layer, how many elements conflict (a_j*b_j < 0), collaborate (> 0) or tie (== 0), and the
positive and negative sums whose total is the dot product a.b (the aggregate gradient similarity).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from . import ops


@dataclass
class ContributionRow:
    name: str
    numel: int
    n_pos: int
    n_neg: int
    n_zero: int
    pos_sum: float
    neg_sum: float

    @property
    def conflicting(self) -> float:
        return self.n_neg / self.numel if self.numel else 0.0

    @property
    def collaborative(self) -> float:
        """Fraction with a*b >= 0 (ties count as collaborative, as in the CPL rule)."""
        return (self.n_pos + self.n_zero) / self.numel if self.numel else 0.0

    @property
    def zero(self) -> float:
        return self.n_zero / self.numel if self.numel else 0.0

    @property
    def dot(self) -> float:
        return self.pos_sum + self.neg_sum

    def __add__(self, other: "ContributionRow") -> "ContributionRow":
        return ContributionRow(self.name, self.numel + other.numel, self.n_pos + other.n_pos,
                               self.n_neg + other.n_neg, self.n_zero + other.n_zero,
                               self.pos_sum + other.pos_sum, self.neg_sum + other.neg_sum)


def _lookup(grads, name, p):
    if isinstance(grads, Mapping):
        if p in grads:
            return grads[p]
        return grads.get(name)
    raise TypeError("gradients must be a mapping (name or parameter -> tensor)")


@torch.no_grad()
def tensor_stats(model, grads_a=None, grads_b=None) -> list[ContributionRow]:
    """One row per named parameter of `model` (an nn.Module or its named_parameters()).

    grads_a, grads_b: mappings name (or parameter) -> tensor; grads_a=None reads each .grad.
    Parameters missing from either side are left out. For the CPL question pass grads_a = the
    injection update direction (or gradient) and grads_b = the mastered reference gradient."""
    named = model.named_parameters() if hasattr(model, "named_parameters") else model
    rows = []
    for name, p in named:
        a = p.grad if grads_a is None else _lookup(grads_a, name, p)
        b = _lookup(grads_b, name, p) if grads_b is not None else None
        if a is None or b is None:
            continue
        a, b = (t.to_local() if hasattr(t, "to_local") else t for t in (a, b))
        if a.numel() != b.numel():
            raise ValueError(f"tensor_stats: for parameter {name!r} the gradients have {a.numel()} "
                             f"and {b.numel()} elements")
        counts, sums = ops.contribution_stats(a.detach().contiguous(), b.detach().to(a.dtype).contiguous())
        c, s = counts.tolist(), sums.tolist()
        rows.append(ContributionRow(name, a.numel(), c[0], c[1], c[2], s[0], s[1]))
    return rows


def layer_key(name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' -> 'model.layers.3'; names without a numbered block
    group by their module ('lm_head.weight' -> 'lm_head', 'model.embed_tokens.weight' ->
    'model.embed_tokens')."""
    m = re.match(r"^(.*?\.\d+)(\.|$)", name)
    if m:
        return m.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


def layer_stats(rows: list[ContributionRow], key=layer_key) -> list[ContributionRow]:
    """Sums per-tensor rows into per-layer rows (first-seen order), plus a final 'total' row."""
    out: dict[str, ContributionRow] = {}
    for r in rows:
        k = key(r.name)
        out[k] = out[k] + r if k in out else ContributionRow(k, r.numel, r.n_pos, r.n_neg, r.n_zero,
                                                             r.pos_sum, r.neg_sum)
    layers = list(out.values())
    if layers:
        total = replace(layers[0])  # a copy: renaming it must not rename the first layer
        for r in layers[1:]:
            total = total + r
        total.name = "total"
        layers.append(total)
    return layers


def format_table(rows: list[ContributionRow]) -> str:
    """A plain-text table of rows (tensor_stats or layer_stats) for printing."""
    header = ("name", "numel", "conflict", "collab", "zero", "pos_sum", "neg_sum", "dot")
    body = [(r.name, f"{r.numel:,}", f"{r.conflicting:.1%}", f"{r.collaborative:.1%}", f"{r.zero:.1%}",
             f"{r.pos_sum:.4g}", f"{r.neg_sum:.4g}", f"{r.dot:.4g}") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(row, widths)))
             for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
