"""Setting up an experiment: items, the model, the pre-injection test, the split, encoded sets,
and the per-epoch measurement every method is judged by."""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import LabConfig
from .data import Encoded, Split, encode, split
from .evaluate import item_correct, score
from .facts import synthetic_items
from .formats import load_jsonl
from .items import Item
from .models import Loaded, load_model


@dataclass
class Lab:
    cfg: LabConfig
    items: list[Item]
    loaded: Loaded
    split: Split
    inject: Encoded          # injection rows (training phrasings): what every method trains on
    mastered_in: Encoded     # mastered in-set rows: all the mastered data a method may use
    eval_train: Encoded      # all split items, training phrasings
    eval_heldout: Encoded    # all split items with held-out phrasings (cross-prompt)
    base_heldout: torch.Tensor  # [n_items] bool, held-out correctness before injection
    _before: dict | None = None

    def measure_before(self) -> dict:
        """measure() of the untrained model: the epoch-0 row of every cell, computed once."""
        if self._before is None:
            self._before = self.measure(self.model)
        return dict(self._before)

    @property
    def model(self):
        return self.loaded.model

    def summary(self) -> dict:
        return {"items": len(self.items), **self.split.as_dict(), "model": self.loaded.info,
                "heldout_items": int(self.eval_heldout.item.unique().numel()) if len(self.eval_heldout) else 0,
                "heldout_mastered_before": int(self.base_heldout[self.mastered].sum())}

    @property
    def mastered(self) -> list[int]:
        return self.split.mastered_in + self.split.mastered_out

    def measure(self, model, heldout: bool = True) -> dict:
        """learned / forgotten (in-set, out-of-set) on training phrasings, the same on held-out
        phrasings (cross-prompt; None when heldout=False: they cost half as much again), and the
        mean loss on mastered questions."""
        n = len(self.items)
        s = self.split
        rows, losses = score(model, self.eval_train)
        ok = item_correct(self.eval_train, rows, n)
        is_mastered = torch.zeros(n, dtype=torch.bool)
        is_mastered[self.mastered] = True
        out = {
            "learned": int(ok[s.inject].sum()),
            "forgotten_in": int((~ok[s.mastered_in]).sum()),
            "forgotten_out": int((~ok[s.mastered_out]).sum()),
            "mastered_loss": float(losses[is_mastered[self.eval_train.item]].mean()),
            "inject_loss": float(losses[~is_mastered[self.eval_train.item]].mean()),
        }
        out["forgotten"] = out["forgotten_in"] + out["forgotten_out"]
        if heldout and len(self.eval_heldout):
            hrows, _ = score(model, self.eval_heldout)
            hok = item_correct(self.eval_heldout, hrows, n)
            has = torch.zeros(n, dtype=torch.bool)
            has[self.eval_heldout.item] = True
            before = self.base_heldout & has
            out["xp_learned"] = int((hok & has)[s.inject].sum())
            out["xp_forgotten"] = int((before & ~hok)[self.mastered].sum())
        else:
            out["xp_learned"] = out["xp_forgotten"] = None
        out["forgotten_keys"] = [self.items[i].key for i in self.mastered if not ok[i]]
        return out


def load_items(cfg: LabConfig) -> list[Item]:
    if not cfg.data:
        return synthetic_items(cfg.n_entities, cfg.relations, cfg.train_templates, cfg.data_seed)
    items = load_jsonl(cfg.data)
    if cfg.model:
        return items
    # The lab's own model knows nothing: it pre-trains on a seeded half of the file, so that the
    # split has mastered questions (what it learned) and injection questions (the other half).
    order = list(range(len(items)))
    random.Random(f"pretrain-half-{cfg.data_seed}").shuffle(order)
    first = set(order[:len(items) // 2])
    return [replace(it, group="pretrain" if i in first else "unseen") for i, it in enumerate(items)]


def prepare(cfg: LabConfig, cache_dir: Path | None = None, progress: bool = True, log=print) -> Lab:
    cfg.validate()
    items = load_items(cfg)
    loaded = load_model(cfg, items, cache_dir, progress, log)
    codec = loaded.codec
    everything = list(range(len(items)))
    enc_all = encode(items, everything, codec, "train")
    rows, _ = score(loaded.model, enc_all)
    correct = item_correct(enc_all, rows, len(items)).tolist()
    eligible = None
    if loaded.info.get("pretrained_by_lab"):
        # Only what the model was taught counts as mastered: an unseen fact answered right is a
        # lucky guess (1 in 8 per relation here), not knowledge to protect nor to inject.
        eligible = [it.group == "pretrain" or not ok for it, ok in zip(items, correct)]
    sp = split(correct, cfg.n_mastered, cfg.n_inject, cfg.data_seed, eligible)
    chosen = sorted(sp.mastered_in + sp.mastered_out + sp.inject)
    with_heldout = [i for i in chosen if items[i].heldout]
    eval_heldout = encode(items, with_heldout, codec, "heldout")
    base_heldout = torch.zeros(len(items), dtype=torch.bool)
    if len(eval_heldout):
        hrows, _ = score(loaded.model, eval_heldout)
        base_heldout = item_correct(eval_heldout, hrows, len(items))
        has = set(with_heldout)
        base_heldout[[i for i in everything if i not in has]] = False
    lab = Lab(cfg, items, loaded, sp,
              inject=encode(items, sp.inject, codec, "train"),
              mastered_in=encode(items, sp.mastered_in, codec, "train"),
              eval_train=encode(items, chosen, codec, "train"),
              eval_heldout=eval_heldout, base_heldout=base_heldout)
    guesses = len(items) - sum(eligible) if eligible else 0
    log(f"split: {len(sp.mastered_in)} mastered in-set + {len(sp.mastered_out)} mastered out-of-set, "
        f"{len(sp.inject)} to inject ({sum(correct)} of {len(items)} answered correctly before"
        + (f"; {guesses} of them unseen lucky guesses, left out)" if guesses else ")"))
    return lab
