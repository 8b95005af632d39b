"""MaskedAdamW: AdamW on a static subset of elements, with optimizer state only for that subset."""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .. import ops
from .. import reference as ref
from . import _layout
from ..masks import PackedMask
from ._base import Item, StateOptimizer, check_args, check_hyper, finite_mode, local, lr_value

MASK_KEY, OFFSETS_KEY = "mask_words", "block_offsets"
DEFAULTS = ("train", "freeze")


class MaskedAdamW(StateOptimizer):
    """AdamW restricted to a fixed boolean mask per parameter (True = trained, False = frozen).

    Storage invariant (per parameter of n elements, k of them active), in the parameter's memory
    order (docs/design.md section 3):
      state['mask_words']    int32 [ceil(n/32)]    the mask, 1 bit per element (reference.pack_mask)
      state['block_offsets'] int64 [ceil(n/1024)]  active elements before each 1024-element block
      state['exp_avg'], state['exp_avg_sq']  fp32 [k]  m and v of the active elements, in order
      state['step']          fp32 0-dim (CPU)
    i.e. 8 B per active element + 0.133 B per element, instead of AdamW's 8 B per element.
    Frozen elements never move: no update, no weight decay.

    masks: a sequence aligned with the parameters (over all groups, in order; None = `default`),
    or a mapping keyed by parameter tensor or, when the optimizer is given named parameters, by
    name. Masks are bool tensors shaped like their parameter. Keys that match no parameter are an
    error. Parameters a mapping leaves out follow `default`: "train" (all elements) or "freeze"
    (none); when `default` is not given they are trained and a warning names them.
    A mask may also be a cpl_kernels.masks.PackedMask (bits, as cpl_masks_once(..., packed=True)
    builds them), taken as it is: no bool tensor the size of the parameter.
    DTensor (FSDP2) parameters are not supported.
    Non-finite gradients (check_finite, as the CPL optimizers): "skip" (default, fused into the
    step: active elements with a NaN/inf gradient are left untouched, counted, and named in a
    RuntimeWarning), "raise" (or True: FloatingPointError before anything is written), False.
    torch.amp.GradScaler's gradients are unscaled inside the step (its fused protocol).
    """

    FLOAT_STATE = ("exp_avg", "exp_avg_sq")
    RAW_STATE = (MASK_KEY, OFFSETS_KEY)
    DEFAULT_FINITE = "skip"

    def __init__(self, params: Iterable, masks: Sequence | Mapping, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, check_finite: bool | str = "skip", default: str | None = None) -> None:
        owner = type(self).__name__
        check_args(owner, amsgrad=amsgrad, foreach=foreach, maximize=maximize, capturable=capturable,
                   differentiable=differentiable, fused=fused)
        check_hyper(owner, lr, eps=eps, betas=betas, weight_decay=weight_decay)
        finite_mode(owner, check_finite)
        if default is not None and default not in DEFAULTS:
            raise ValueError(f"{owner}: default must be one of {DEFAULTS} or None, got {default!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False,
                        maximize=False, foreach=foreach, capturable=False, differentiable=False,
                        fused=fused, check_finite=check_finite)
        super().__init__(params, defaults)
        self._nonfinite: list[tuple[Tensor, Tensor]] = []  # (param, count) of the last step
        params_flat = self._all_params()
        for p in params_flat:
            if hasattr(p, "to_local"):
                raise NotImplementedError(f"{owner}: parameter {self.param_name(p)} is a DTensor; "
                                          "MaskedAdamW needs whole (unsharded) parameters")
        chosen = self._masks_per_param(owner, params_flat, masks, default)
        states = [self._state_for(p, m) for p, m in zip(params_flat, chosen)]  # all checked first
        for p, st in zip(params_flat, states):
            self.state[p] = st

    def _masks_per_param(self, owner: str, params: list[Tensor], masks, default: str | None) -> list:
        fill = "train" if default is None else default
        if isinstance(masks, Mapping):
            names = self._param_names()
            by_name = {n: i for i, n in enumerate(names) if n is not None}
            by_id = {id(p): i for i, p in enumerate(params)}
            chosen: list = [None] * len(params)
            unknown = []
            for key, mask in masks.items():
                i = by_id.get(id(key)) if isinstance(key, Tensor) else by_name.get(key) if isinstance(key, str) else None
                if i is None:
                    unknown.append(key if not isinstance(key, Tensor) else f"<tensor {tuple(key.shape)}>")
                else:
                    chosen[i] = mask
            if unknown:
                hint = ("this optimizer was built without parameter names (from model.parameters()): "
                        "build it from model.named_parameters() or key the masks by parameter tensors"
                        if not by_name else "keys must be this optimizer's parameters or their names")
                raise ValueError(f"{owner}: {len(unknown)} mask key(s) match no parameter: "
                                 f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}; {hint}")
            missing = [self.param_name(p) for p, m in zip(params, chosen) if m is None]
            if missing and default is None:
                warnings.warn(f"{owner}: {len(missing)} of {len(params)} parameters have no mask and are "
                              f"trained on all elements: {missing[:5]}{' ...' if len(missing) > 5 else ''}. "
                              "Pass default='train' or default='freeze' to say which you mean.",
                              UserWarning, stacklevel=3)
        else:
            if len(masks) != len(params):
                raise ValueError(f"{owner}: got {len(masks)} masks for {len(params)} parameters")
            chosen = list(masks)
        return [torch.full_like(p, fill == "train", dtype=torch.bool) if m is None else m
                for p, m in zip(params, chosen)]

    @torch.no_grad()
    def _state_for(self, p: Tensor, mask) -> dict:
        owner = type(self).__name__
        if isinstance(mask, PackedMask):
            if mask.shape != p.shape:
                raise ValueError(f"{owner}: the mask for parameter {self.param_name(p)} has shape "
                                 f"{tuple(mask.shape)} but the parameter has shape {tuple(p.shape)}")
            if _layout.dense(p) and p.is_contiguous():  # the words are in row-major order: as they are
                return {
                    "step": torch.tensor(0.0, dtype=torch.float32),
                    "exp_avg": torch.zeros(mask.active, dtype=torch.float32, device=p.device),
                    "exp_avg_sq": torch.zeros(mask.active, dtype=torch.float32, device=p.device),
                    MASK_KEY: mask.words.to(p.device),
                    OFFSETS_KEY: mask.block_offsets.to(p.device),
                }
            mask = mask.unpack()  # another memory order: rebuilt for this parameter's layout
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{owner}: the mask for parameter {self.param_name(p)} must be a bool "
                            f"tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != p.shape:
            raise ValueError(f"{owner}: the mask for parameter {self.param_name(p)} has shape "
                             f"{tuple(mask.shape)} but the parameter has shape {tuple(p.shape)}")
        # Packed in the parameter's memory order, the order the kernel walks.
        words = ref.pack_mask(_layout.flat_in_layout_of(mask.to(p.device), p)).contiguous()
        k = int(mask.sum())
        return {
            "step": torch.tensor(0.0, dtype=torch.float32),
            "exp_avg": torch.zeros(k, dtype=torch.float32, device=p.device),
            "exp_avg_sq": torch.zeros(k, dtype=torch.float32, device=p.device),
            MASK_KEY: words,
            OFFSETS_KEY: ref.mask_block_offsets(words, p.numel()).contiguous(),
        }

    def active_counts(self) -> list[int]:
        """Active (trained) elements per parameter, over all groups in order."""
        return [self.state[p]["exp_avg"].numel() for p in self._all_params()]

    def _plan_group(self, group, items: list[Item]):
        owner = type(self).__name__
        beta1, beta2 = group["betas"]
        lr = lr_value(owner, group["lr"])
        check_hyper(owner, lr, eps=group["eps"], betas=(beta1, beta2), weight_decay=group["weight_decay"])
        work = []
        for it in items:
            state = self.state.get(it.param)
            if not state or MASK_KEY not in state:
                raise RuntimeError(f"{owner}.step: parameter {self.param_name(it.param)} has no mask state")
            step = self._step_value(it.param, state)
            if state["exp_avg"].numel() > 0:  # else nothing trained in this tensor
                work.append((it, state, step + 1))

        skip = finite_mode(owner, group["check_finite"]) == "skip"
        grad_scale = self._grad_scale

        def run() -> None:
            for it, state, step in work:
                bad = ops.masked_adamw_step_(it.work_param, it.work_grad, state[MASK_KEY], state[OFFSETS_KEY],
                                             state["exp_avg"], state["exp_avg_sq"], step, lr, beta1, beta2,
                                             group["eps"], group["weight_decay"], skip, grad_scale)
                state["step"] += 1
                if skip:
                    self._nonfinite.append((it.param, bad))

        return run

    def _begin_step(self) -> None:
        self._nonfinite = []

    def _end_step(self) -> None:
        """check_finite="skip": name the parameters whose non-finite gradient elements were left
        untouched (one host read of the counts; they live on the parameters' devices)."""
        done = getattr(self, "_nonfinite", [])
        if not done:
            return
        counts = torch.stack([c.to(done[0][1].device) for _, c in done]).tolist()
        hits = [(self.param_name(p), c) for (p, _), c in zip(done, counts) if c]
        if hits:
            listing = ", ".join(f"{name} ({count})" for name, count in hits[:8])
            more = f" and {len(hits) - 8} more" if len(hits) > 8 else ""
            warnings.warn(f"{type(self).__name__}.step: non-finite gradient elements were left untouched "
                          f"(no update, no state change) in {len(hits)} parameter(s): {listing}{more}. "
                          "check_finite='raise' refuses such steps instead.", RuntimeWarning, stacklevel=5)

    @property
    def nonfinite_counts(self) -> list[int]:
        """Per parameter stepped last step (check_finite="skip"), the active elements whose gradient
        was NaN or inf and that were left untouched."""
        return [int(c) for _, c in getattr(self, "_nonfinite", [])]

    # ---- checkpoints -----------------------------------------------------------------------------

    def _check_param_state(self, p, name, floats, raws, has_step) -> None:
        owner = f"{type(self).__name__}.load_state_dict"
        words, offsets = raws.get(MASK_KEY), raws.get(OFFSETS_KEY)
        if words is None or offsets is None:
            raise ValueError(f"{owner}: the checkpoint has no mask for parameter {name}; it was not "
                             "saved by MaskedAdamW")
        n = p.numel()
        for key, value, want in ((MASK_KEY, words, (ref.num_mask_words(n), torch.int32)),
                                 (OFFSETS_KEY, offsets, (ref.num_offset_blocks(n), torch.int64))):
            if (value.numel(), value.dtype) != want:
                raise ValueError(f"{owner}: {key} for parameter {name} has {value.numel()} {value.dtype} "
                                 f"entries, expected {want[0]} {want[1]}; was the checkpoint saved from "
                                 "a different model?")
        if n % 32 and int(words[-1].item()) & ~((1 << (n % 32)) - 1) & 0xFFFFFFFF:
            raise ValueError(f"{owner}: the mask of parameter {name} has bits set past its {n} elements")
        if not torch.equal(offsets.cpu(), ref.mask_block_offsets(words.cpu(), n)):
            raise ValueError(f"{owner}: block_offsets of parameter {name} do not match its mask")
        k = int(ref.unpack_mask(words.cpu(), n).sum())
        for key in ("exp_avg", "exp_avg_sq"):
            value = floats.get(key)
            if value is None or value.numel() != k:
                got = "none" if value is None else f"{value.numel()} entries"
                raise ValueError(f"{owner}: {key} of parameter {name} has {got} but its mask has {k} "
                                 "active elements (MaskedAdamW keeps one per active element)")
            floats[key] = value.reshape(-1).contiguous()
