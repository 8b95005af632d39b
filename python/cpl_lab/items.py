"""The one record every data source produces: a question with its answer and phrasings.

A fact (or JSONL question) is an *item*. It is "known" when the model answers every one of its
training phrasings correctly; cross-prompt generalisation asks the same on `heldout` phrasings
that no training step ever sees.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Item:
    key: str                                # stable id, e.g. "zorvak/color" or "data.jsonl:17"
    prompts: tuple[str, ...]                # training phrasings; prompts[0] is the canonical one
    answer: str                             # the answer text (an option letter for multiple choice)
    options: tuple[str, ...] | None = None  # option letters for multiple choice, None = generative
    heldout: tuple[str, ...] = field(default=())  # phrasings never trained on (cross-prompt test)
    group: str = "pool"                     # "pretrain" or "unseen" for the lab's own model

    def __post_init__(self):
        if not self.prompts:
            raise ValueError(f"item {self.key!r} has no prompt")
        if self.options is not None and self.answer not in self.options:
            raise ValueError(f"item {self.key!r}: answer {self.answer!r} is not one of {self.options}")
