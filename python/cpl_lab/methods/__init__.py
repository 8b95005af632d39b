"""Injection methods by name (the --methods choices)."""
from .base import Context, Method, loss_fn  # noqa: F401
from .baselines import AGEM, FineTune, Replay
from .cpl import CPL, RandomMask
from .lora import LoRA
from .static import CPLOnce, RandomOnce

REGISTRY = {cls.name: cls for cls in (FineTune, CPL, CPLOnce, RandomMask, RandomOnce, AGEM, Replay, LoRA)}

DESCRIPTIONS = {
    "ft": "plain fine-tuning on the injection set",
    "cpl": "CPL optimizer, reference refreshed per step or per epoch (--reference)",
    "cpl-once": "CPL mask computed once at the start, trained with MaskedAdamW (compact state)",
    "random": "random mask re-drawn every step, frozen fraction matched to CPL's",
    "random-once": "random static mask with cpl-once's per-tensor sparsity, MaskedAdamW",
    "agem": "A-GEM: project the gradient when it conflicts with a mastered batch's gradient",
    "replay": "each step also trains on a random batch of mastered in-set questions",
    "lora": "LoRA (peft) on every linear layer",
}
