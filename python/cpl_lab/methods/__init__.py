"""Injection methods by name (the --methods choices)."""
from .base import Context, Method, loss_fn  # noqa: F401
from .baselines import AGEM, FineTune, Replay
from .cpl import CPL, RandomMask
from .ewc import EWC
from .lora import LoRA
from .mofo import CPLMoFO, MoFO
from .masked_epoch import CPLMaskedEpoch
from .static import CPLOnce, RandomOnce
from .surgery import Surgery

REGISTRY = {cls.name: cls for cls in (FineTune, CPL, CPLOnce, CPLMaskedEpoch, RandomMask, RandomOnce, AGEM, Replay,
                                      LoRA, EWC, Surgery, MoFO, CPLMoFO)}

