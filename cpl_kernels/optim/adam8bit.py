"""CPLAdam8bit and CPLAdamW8bit: CPLAdam / CPLAdamW with m and v held in the step engine's 8-bit
blockwise state format (cpl_kernels/quant8.py, docs/design.md section 8).

State per parameter of at least quant8.MIN_NUMEL (4096) elements: 'exp_avg_codes' and
'exp_avg_sq_codes' (uint8, one per element, in the parameter's memory order), 'exp_avg_absmax' and
'exp_avg_sq_absmax' (fp32, one per block of 256 elements), 'step', and the sign codes while a
reference is set: 2.03 B/param (2.28 with a reference) instead of 8 (8.25). Smaller parameters
(norms, biases) keep CPLAdam's fp32 'exp_avg' / 'exp_avg_sq', as bitsandbytes and torchao do.
m uses the signed dynamic map, v the unsigned one (those libraries' maps).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .. import engine, quant8
from ._base import Item, local
from ._cpl import CODES_KEY
from .adam import STATE_KEYS, CPLAdam

CODES_SUFFIX, ABSMAX_SUFFIX = "_codes", "_absmax"
FORMAT_8BIT = "blockwise8"
SIGNED = (True, False)  # m may be negative; v never is


def _codes_key(key: str) -> str:
    return key + CODES_SUFFIX


def _absmax_key(key: str) -> str:
    return key + ABSMAX_SUFFIX


class _Blockwise8Adam(CPLAdam):
    """The 8-bit state format on CPLAdam's rule (the subclasses pick the decay)."""

    FLOAT_STATE = STATE_KEYS + tuple(_absmax_key(k) for k in STATE_KEYS)
    # uint8 codes kept out of torch's dtype cast on load, like the sign codes (_base docstring).
    RAW_STATE = (CODES_KEY,) + tuple(_codes_key(k) for k in STATE_KEYS)
    LOCAL_STATE = tuple(_absmax_key(k) for k in STATE_KEYS)  # per block, not shaped like the param

    def _qmaps(self, device: torch.device) -> Tensor:
        cache = self.__dict__.setdefault("_qmaps_by_device", {})
        if device not in cache:
            cache[device] = quant8.qmaps(SIGNED, device)
        return cache[device]

    def _item_state(self, owner: str, it: Item, state, keys: tuple[str, ...], installs: list):
        n = it.local.numel()
        if not quant8.quantized(n):
            return super()._item_state(owner, it, state, keys, installs)
        name = self.param_name(it.param)
        stray = [k for k in keys if k in state]
        if stray:
            raise ValueError(f"{owner}.step: parameter {name} has fp32 {stray} in its state, but "
                             f"{owner} keeps the state of a tensor of {n} elements in 8 bits")
        slots, fresh = [], False
        for key, signed in zip(keys, SIGNED):
            codes, absmax = state.get(_codes_key(key)), state.get(_absmax_key(key))
            if codes is None or absmax is None:
                fresh = True
                # Codes of 0.0 (not torchao's code 0, which is -0.99 * absmax 0 = -0.0).
                zero = quant8.dynamic_map(signed).index(0.0)
                codes = torch.full((n,), zero, dtype=torch.uint8, device=it.local.device)
                absmax = torch.zeros(quant8.num_blocks(n), dtype=torch.float32, device=it.local.device)
                installs += [(it.param, _codes_key(key), codes), (it.param, _absmax_key(key), absmax)]
            else:
                for k, t, dtype, numel in ((_codes_key(key), codes, torch.uint8, n),
                                           (_absmax_key(key), absmax, torch.float32, quant8.num_blocks(n))):
                    t = local(t)
                    if t.dtype != dtype or t.numel() != numel or not t.is_contiguous():
                        raise ValueError(f"{owner}.step: '{k}' of parameter {name} holds {t.numel()} "
                                         f"{t.dtype}; expected {numel} contiguous {dtype}")
            slots += [local(codes).view(-1), local(absmax).view(-1)]
        return FORMAT_8BIT, slots, fresh

    def _engine_step(self, fmt, params, grads, slots, codes, kind, step, lr, hyper, group, mode, grad_scale):
        if fmt != FORMAT_8BIT:
            return super()._engine_step(fmt, params, grads, slots, codes, kind, step, lr, hyper, group, mode,
                                        grad_scale)
        return engine.cpl_step_8bit_(
            params, grads, [s[0] for s in slots], [s[1] for s in slots], [s[2] for s in slots],
            [s[3] for s in slots], self._qmaps(params[0].device), codes, kind, step, lr, hyper,
            group["criterion"], group["strict"], mode is not False, grad_scale, None)

    def _check_param_state(self, p, name, floats, raws, has_step) -> None:
        owner = f"{type(self).__name__}.load_state_dict"
        n = local(p).numel()
        if not quant8.quantized(n):
            eight_bit = {f(k) for k in STATE_KEYS for f in (_codes_key, _absmax_key)}
            extra = [k for k in list(floats) + list(raws) if k in eight_bit]
            if extra:
                raise ValueError(f"{owner}: parameter {name} ({n} elements) keeps fp32 state, but the "
                                 f"checkpoint holds 8-bit {extra} for it; was it saved from a different model?")
            return super()._check_param_state(p, name, floats, raws, has_step)
        fp32 = [k for k in STATE_KEYS if k in floats]
        if fp32:
            raise ValueError(f"{owner}: the checkpoint holds fp32 {fp32} for parameter {name}, whose "
                             f"state {type(self).__name__} keeps in 8 bits; it was saved by another "
                             "optimizer (load it into CPLAdamW / torch.optim.AdamW)")
        for key in STATE_KEYS:
            got = {_codes_key(key): raws.get(_codes_key(key)), _absmax_key(key): floats.get(_absmax_key(key))}
            present = [k for k, v in got.items() if v is not None]
            if len(present) == 1:
                raise ValueError(f"{owner}: the checkpoint holds '{present[0]}' but not its pair for "
                                 f"parameter {name}")
            for k, t, dtype, numel in ((_codes_key(key), got[_codes_key(key)], torch.uint8, n),
                                       (_absmax_key(key), got[_absmax_key(key)], torch.float32,
                                        quant8.num_blocks(n))):
                if t is not None and (t.dtype != dtype or t.numel() != numel):
                    raise ValueError(f"{owner}: '{k}' of parameter {name} holds {t.numel()} {t.dtype} "
                                     f"but its {n} elements need {numel} {dtype}; was the checkpoint "
                                     "saved from a different model?")
        super()._check_param_state(p, name, {}, {k: v for k, v in raws.items() if k == CODES_KEY}, has_step)


class CPLAdam8bit(_Blockwise8Adam):
    """CPLAdam (L2 weight decay, torch.optim.Adam's rule) with 8-bit blockwise m and v (module
    docstring). Same arguments, criteria, strict, check_finite and GradScaler protocol as CPLAdam."""


class CPLAdamW8bit(_Blockwise8Adam):
    """CPLAdamW (decoupled weight decay) with 8-bit blockwise m and v (module docstring): the CPL
    rule at 2.3 B/param of optimizer state. With no reference it is an 8-bit AdamW (tracks
    torchao's AdamW8bit: tests/test_optim_8bit.py)."""

    DECOUPLED = True

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, criterion: str = "update", strict: bool = True,
                 check_finite: bool | str = "skip") -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, foreach=foreach, maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused, criterion=criterion,
                         strict=strict, check_finite=check_finite)
