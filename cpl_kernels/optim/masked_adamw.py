"""MaskedAdamW: AdamW on a static subset of elements, with optimizer state only for that subset."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .. import ops
from .. import reference as ref
from ._base import StateOptimizer, check_args, check_hyper, local

MASK_KEY, OFFSETS_KEY = "mask_words", "block_offsets"


class MaskedAdamW(StateOptimizer):
    """AdamW restricted to a fixed boolean mask per parameter (True = trained, False = frozen).

    Storage invariant (per parameter of n elements, k of them active):
      state['mask_words']    int32 [ceil(n/32)]    the mask, 1 bit per element (reference.pack_mask)
      state['block_offsets'] int64 [ceil(n/1024)]  active elements before each 1024-element block
      state['exp_avg'], state['exp_avg_sq']  fp32 [k]  m and v of the active elements, in order
      state['step']          fp32 0-dim (CPU)
    i.e. 8 B per active element + 0.133 B per element, instead of AdamW's 8 B per element.
    Frozen elements never move: no update, no weight decay.

    masks: a sequence aligned with the parameters (over all groups, in order), or a mapping keyed
    by parameter tensor or, when the optimizer is given named parameters, by name. Masks must be
    bool tensors shaped like their parameter. A parameter without a mask (mapping without its key)
    is trained on all elements. DTensor (FSDP2) parameters are not supported.
    Non-finite gradients raise FloatingPointError before anything is written (check_finite=True).
    """

    FLOAT_STATE = ("exp_avg", "exp_avg_sq")
    RAW_STATE = (MASK_KEY, OFFSETS_KEY)

    def __init__(self, params, masks, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, check_finite=True):
        owner = type(self).__name__
        check_args(owner, amsgrad=amsgrad, foreach=foreach, maximize=maximize, capturable=capturable,
                   differentiable=differentiable, fused=fused)
        check_hyper(owner, lr, eps=eps, betas=betas, weight_decay=weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False,
                        maximize=False, foreach=foreach, capturable=False, differentiable=False,
                        fused=fused, check_finite=check_finite)
        super().__init__(params, defaults)
        params_flat = [(p, names[i] if names else None)
                       for g in self.param_groups
                       for i, p in enumerate(g["params"]) for names in [g.get("param_names")]]
        if not isinstance(masks, Mapping) and len(masks) != len(params_flat):
            raise ValueError(f"{owner}: got {len(masks)} masks for {len(params_flat)} parameters")
        for i, (p, name) in enumerate(params_flat):
            if hasattr(p, "to_local"):
                raise NotImplementedError(f"{owner}: parameter {self.param_name(p)} is a DTensor; "
                                          "MaskedAdamW needs whole (unsharded) parameters")
            if isinstance(masks, Mapping):
                mask = masks[p] if p in masks else masks.get(name) if name is not None else None
            else:
                mask = masks[i]
            if mask is None:
                mask = torch.ones_like(p, dtype=torch.bool)
            self._set_mask(p, mask)

    @torch.no_grad()
    def _set_mask(self, p: Tensor, mask: Tensor) -> None:
        owner = type(self).__name__
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{owner}: the mask for parameter {self.param_name(p)} must be a bool "
                            f"tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != p.shape:
            raise ValueError(f"{owner}: the mask for parameter {self.param_name(p)} has shape "
                             f"{tuple(mask.shape)} but the parameter has shape {tuple(p.shape)}")
        words = ref.pack_mask(mask.to(p.device)).contiguous()
        k = int(mask.sum())
        self.state[p] = {
            "step": torch.tensor(0.0, dtype=torch.float32),
            "exp_avg": torch.zeros(k, dtype=torch.float32, device=p.device),
            "exp_avg_sq": torch.zeros(k, dtype=torch.float32, device=p.device),
            MASK_KEY: words,
            OFFSETS_KEY: ref.mask_block_offsets(words, p.numel()).contiguous(),
        }

    def active_counts(self) -> list[int]:
        """Active (trained) elements per parameter, over all groups in order."""
        return [self.state[p]["exp_avg"].numel() for g in self.param_groups for p in g["params"]]

    def _step_group(self, group, items) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
        for p, lp, lg in items:
            state = self.state[p]
            if state["exp_avg"].numel() == 0:
                continue  # nothing trained in this tensor
            step = float(state["step"]) + 1
            ops.masked_adamw_step_(lp, lg, state[MASK_KEY], state[OFFSETS_KEY], state["exp_avg"],
                                   state["exp_avg_sq"], step, lr, beta1, beta2, eps, wd)
            state["step"] += 1

    def _validate_raw(self, p: Tensor, key: str, value: Tensor) -> Tensor:
        n = local(p).numel()
        want = (ref.num_mask_words(n), torch.int32) if key == MASK_KEY else (ref.num_offset_blocks(n), torch.int64)
        if (value.numel(), value.dtype) != want:
            raise ValueError(f"{type(self).__name__}.load_state_dict: {key} for parameter "
                             f"{self.param_name(p)} has {value.numel()} {value.dtype} entries, expected "
                             f"{want[0]} {want[1]}; was the checkpoint saved from a different model?")
        return value.reshape(-1).contiguous()

    def _after_load(self) -> None:
        # The compact state must hold exactly one entry per active element of the loaded mask;
        # the kernel trusts this (ops.masked_adamw_step_ checks only an upper bound).
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state[p]
                words = st.get(MASK_KEY)
                if words is None:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: no mask for parameter "
                                     f"{self.param_name(p)} in the checkpoint")
                if not torch.equal(st[OFFSETS_KEY].cpu(), ref.mask_block_offsets(words.cpu(), p.numel())):
                    raise ValueError(f"{type(self).__name__}.load_state_dict: block_offsets of parameter "
                                     f"{self.param_name(p)} do not match its mask")
                k = int(ref.unpack_mask(words.cpu(), p.numel()).sum())
                for key in ("exp_avg", "exp_avg_sq"):
                    if st[key].numel() != k:
                        raise ValueError(f"{type(self).__name__}.load_state_dict: {key} of parameter "
                                         f"{self.param_name(p)} has {st[key].numel()} entries but its "
                                         f"mask has {k} active elements")
                    st[key] = st[key].reshape(-1).contiguous()
