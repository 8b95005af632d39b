"""Encoded question sets as padded tensors, batching, and the paper's split.

Split (as in the paper): mastered = items the model answers correctly before injection, injection
= items it answers wrongly. The mastered set is halved: the "in-set" half is all the reference
gradient (CPL, A-GEM) and replay ever see; the "out-of-set" half measures forgetting of facts the
reference never saw.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .items import Item


@dataclass
class Encoded:
    """Rows of LEFT-padded sequences, so every answer ends at the last column: the model then
    only has to produce logits for the last few positions (logits_to_keep), which matters for a
    150K-token vocabulary. labels is -100 except on answer tokens (unshifted)."""
    item: torch.Tensor            # [N] index of the row's item in the lab's item list
    input_ids: torch.Tensor       # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    labels: torch.Tensor          # [N, T]
    options: torch.Tensor | None  # [N, K] option token ids (multiple choice) or None
    target: torch.Tensor | None   # [N] index of the right option
    pad_id: int = 0

    @property
    def answer_width(self) -> int:
        """Longest answer in tokens: the answers occupy the last answer_width columns at most."""
        return int((self.labels != -100).sum(1).max()) if len(self) else 0

    def __len__(self) -> int:
        return self.item.numel()

    def rows(self, idx) -> "Encoded":
        idx = torch.as_tensor(idx, dtype=torch.long)
        width = int(self.attention_mask[idx].sum(1).max()) if idx.numel() else 1
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Encoded(self.item[idx], self.input_ids[idx, -width:], self.attention_mask[idx, -width:],
                       self.labels[idx, -width:], pick(self.options), pick(self.target), self.pad_id)

    def cat(self, other: "Encoded") -> "Encoded":
        """Rows of both (replay mixes a mastered batch into an injection batch)."""
        width = max(self.input_ids.shape[1], other.input_ids.shape[1])
        pad = lambda t, v: torch.nn.functional.pad(t, (width - t.shape[1], 0), value=v)  # noqa: E731
        both = lambda a, b: None if a is None or b is None else torch.cat([a, b])  # noqa: E731
        pad_id = self.pad_id
        return Encoded(torch.cat([self.item, other.item]),
                       torch.cat([pad(self.input_ids, pad_id), pad(other.input_ids, pad_id)]),
                       torch.cat([pad(self.attention_mask, 0), pad(other.attention_mask, 0)]),
                       torch.cat([pad(self.labels, -100), pad(other.labels, -100)]),
                       both(self.options, other.options), both(self.target, other.target), pad_id)

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        """Consecutive batches; shuffled when a generator is given."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            yield self.rows(order[start:start + batch_size])

    def sample(self, batch_size: int, generator: torch.Generator) -> "Encoded":
        """A random batch without replacement (the per-step reference and replay batches)."""
        return self.rows(torch.randperm(len(self), generator=generator)[:batch_size])


def encode(items: list[Item], indices, codec, phrasing: str = "train") -> Encoded:
    """One row per (item, phrasing) for the items at `indices`; phrasing "train" or "heldout"."""
    rows = []
    for i in indices:
        it = items[i]
        for prompt in (it.prompts if phrasing == "train" else it.heldout):
            p_ids, a_ids = codec.encode(prompt, it.answer)
            opts = codec.option_ids(prompt, it.options) if it.options else None
            rows.append((i, p_ids, a_ids, opts, it.options.index(it.answer) if it.options else None))
    if any(r[3] is not None for r in rows) and any(r[3] is None for r in rows):
        raise ValueError("cannot mix multiple-choice and generative items in one set")
    width = max((len(p) + len(a) for _, p, a, _, _ in rows), default=1)
    n = len(rows)
    ids = torch.full((n, width), codec.pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for r, (_, p, a, _, _) in enumerate(rows):
        ids[r, width - len(p) - len(a):] = torch.tensor(p + a)
        mask[r, width - len(p) - len(a):] = 1
        labels[r, width - len(a):] = torch.tensor(a)
    mc = n > 0 and rows[0][3] is not None
    k = max((len(r[3]) for r in rows), default=0) if mc else 0
    options = torch.tensor([r[3] + [r[3][0]] * (k - len(r[3])) for r in rows]) if mc else None
    target = torch.tensor([r[4] for r in rows]) if mc else None
    return Encoded(torch.tensor([r[0] for r in rows], dtype=torch.long), ids, mask, labels,
                   options, target, codec.pad_id)


@dataclass
class Split:
    mastered_in: list[int]
    mastered_out: list[int]
    inject: list[int]

    def as_dict(self) -> dict:
        return {"mastered_in": len(self.mastered_in), "mastered_out": len(self.mastered_out),
                "inject": len(self.inject)}


def split(correct: list[bool], n_mastered: int | None, n_inject: int | None, seed: int,
          eligible: list[bool] | None = None) -> Split:
    """Mastered / injection split of items by their pre-injection correctness, capped and halved.
    Items with eligible[i] False take part in neither set."""
    rng = random.Random(f"split-{seed}")
    ok = eligible or [True] * len(correct)
    mastered = [i for i, c in enumerate(correct) if c and ok[i]]
    inject = [i for i, c in enumerate(correct) if not c and ok[i]]
    rng.shuffle(mastered)
    rng.shuffle(inject)
    mastered = mastered[:n_mastered] if n_mastered else mastered
    inject = inject[:n_inject] if n_inject else inject
    if len(mastered) < 2:
        raise ValueError(f"only {len(mastered)} mastered questions: the model must answer at least "
                         "two correctly before injection (pre-train longer or use other data)")
    if not inject:
        raise ValueError("no injection questions: the model already answers every question")
    half = len(mastered) // 2
    return Split(sorted(mastered[:half]), sorted(mastered[half:]), sorted(inject))
