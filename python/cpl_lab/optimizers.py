"""The four optimizers of the paper, plain (torch.optim) or with the CPL rule (cpl_kernels).

Plain fine-tuning and the baselines use torch.optim itself, not a CPL optimizer without a
reference: the baseline is then torch's own code, whatever cpl_kernels does. The exception is
"adamw8bit" (8-bit blockwise m and v), which torch does not have: there the baselines use
CPLAdamW8bit with no reference (an 8-bit AdamW that tracks torchao's AdamW8bit, tested in
tests/test_optim_8bit.py) and CPL uses it with one.
"""
from __future__ import annotations

import torch

import cpl_kernels

from .config import LabConfig


def _kwargs(kind: str, lr: float, cfg: LabConfig) -> dict:
    if kind == "sgd":
        return dict(lr=lr, momentum=0.0)
    if kind == "momentum":
        return dict(lr=lr, momentum=cfg.momentum)
    if kind == "adam":
        return dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if kind in ("adamw", "adamw8bit"):
        return dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}")


def plain(params, lr: float, cfg: LabConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw8bit":
        opt = cpl_kernels.CPLAdamW8bit(params, **_kwargs(cfg.optimizer, lr, cfg))
        opt.clear_reference()  # plain 8-bit AdamW: running without a reference is intended
        return opt
    cls = {"sgd": torch.optim.SGD, "momentum": torch.optim.SGD, "adam": torch.optim.Adam,
           "adamw": torch.optim.AdamW}[cfg.optimizer]
    return cls(params, **_kwargs(cfg.optimizer, lr, cfg))


def cpl(params, lr: float, cfg: LabConfig):
    cls = {"sgd": cpl_kernels.CPLSGD, "momentum": cpl_kernels.CPLSGD, "adam": cpl_kernels.CPLAdam,
           "adamw": cpl_kernels.CPLAdamW, "adamw8bit": cpl_kernels.CPLAdamW8bit}[cfg.optimizer]
    return cls(params, criterion=cfg.criterion, strict=cfg.strict, **_kwargs(cfg.optimizer, lr, cfg))


def mofo(model: torch.nn.Module, lr: float, cfg: LabConfig) -> "cpl_kernels.MoFOAdamW":
    """MoFOAdamW over the trainable parameters, filtered per tensor at cfg.mofo_alpha except norms
    and biases, which take every update (alpha 1), as the MoFO authors' AdamW_MoFO does (names
    containing "norm" or "bias"). The CPL criterion applies once a reference is set (cpl-mofo)."""
    if cfg.optimizer not in ("adam", "adamw"):
        raise ValueError(f"mofo methods use MoFOAdamW and need --optimizer adam or adamw, not {cfg.optimizer!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    full = [p for n, p in named if "norm" in n or "bias" in n]
    groups = [{"params": [p for n, p in named if not ("norm" in n or "bias" in n)]}]
    if full:
        groups.append({"params": full, "alpha": 1.0})
    return cpl_kernels.MoFOAdamW(groups, alpha=cfg.mofo_alpha, criterion=cfg.criterion, strict=cfg.strict,
                                 **_kwargs(cfg.optimizer, lr, cfg))


def masked(params, masks, lr: float, cfg: LabConfig):
    """MaskedAdamW (compact state) for a static mask. It is AdamW only: with "adam" the weight
    decay is zero, which is Adam; SGD has no compact-state counterpart in the library."""
    if cfg.optimizer not in ("adam", "adamw"):
        raise ValueError(f"mask methods (cpl-once, cpl-masked-epoch, random-once) use MaskedAdamW (fp32 state) "
                         f"and need --optimizer adam or adamw, not {cfg.optimizer!r}")
    return cpl_kernels.MaskedAdamW(params, masks=masks, **_kwargs(cfg.optimizer, lr, cfg))
