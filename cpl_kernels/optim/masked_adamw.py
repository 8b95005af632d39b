"""MaskedAdamW: AdamW on a subset of elements, with optimizer state only for that subset; the
subset can be changed while training (update_masks) and DTensor (FSDP2) parameters are stepped
shard by shard."""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain

import torch
from torch import Tensor

from .. import ops
from .. import reference as ref
from . import _mask_state, _shard_state
from ._base import RAW_KEY, Item, StateOptimizer, local, warn_nonfinite
from ._mask_state import MASK_KEY, OFFSETS_KEY
from ._options import check_args, check_hyper, finite_mode, lr_value

DEFAULTS = ("train", "freeze")


class MaskedAdamW(StateOptimizer):
    """AdamW restricted to a boolean mask per parameter (True = trained, False = frozen).

    Storage invariant (per parameter of n elements, k of them active), in the parameter's memory
    order (docs/design.md section 3); for a DTensor parameter, of its local shard:
      state['mask_words']    int32 [ceil(n/32)]    the mask, 1 bit per element (reference.pack_mask)
      state['block_offsets'] int64 [ceil(n/1024)]  active elements before each 1024-element block
      state['exp_avg'], state['exp_avg_sq']  fp32 [k]  m and v of the active elements, in order
      state['step']          fp32 0-dim (CPU)
    i.e. 8 B per active element + 0.133 B per element, instead of AdamW's 8 B per element.
    Frozen elements never move: no update, no weight decay.

    masks: a sequence aligned with the parameters (over all groups, in order; None = `default`),
    or a mapping keyed by parameter tensor or, when the optimizer is given named parameters, by
    name. A mask is a bool tensor shaped like its parameter; for a DTensor parameter, a DTensor
    placed like it or the full plain tensor (each rank keeps its shard's part); int32 words
    already packed for the (local) tensor; or a cpl_kernels.masks.PackedMask (bits, as
    cpl_masks_once(..., packed=True) builds them: no bool tensor the size of the parameter).
    Keys that match no parameter are an error naming them.
    Parameters a mapping leaves out follow `default`: "train" (all elements) or "freeze" (none);
    when `default` is not given they are trained and a warning names them.
    update_masks() changes the masks while training. Checkpoints of DTensor parameters hold each
    rank's compact state and resume on the same world size only (docs/distributed.md).
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
        words = self._masks_per_param(owner, params_flat, masks, default)  # all checked first
        for p, w in zip(params_flat, words):
            self.state[p] = _mask_state.state_from_words(w, local(p).numel())

    # ---- masks ---------------------------------------------------------------------------------

    def _resolve(self, owner: str, params: list[Tensor], masks) -> list:
        """Masks aligned with `params` (None where none is given); keys that match no parameter
        are an error naming them."""
        if isinstance(masks, Mapping):
            names = self._param_names()
            by_name = {n: i for i, n in enumerate(names) if n is not None}
            by_id = {id(p): i for i, p in enumerate(params)}
            chosen: list = [None] * len(params)
            unknown = []
            for key, mask in masks.items():
                i = (by_id.get(id(key)) if isinstance(key, Tensor)
                     else by_name.get(key) if isinstance(key, str) else None)
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
            return chosen
        if isinstance(masks, Tensor) or not isinstance(masks, Sequence):
            raise TypeError(f"{owner}: masks must be a sequence aligned with the parameters or a "
                            f"mapping keyed by parameter or name, got {type(masks).__name__}")
        if len(masks) != len(params):
            raise ValueError(f"{owner}: got {len(masks)} masks for {len(params)} parameters")
        return list(masks)

    def _masks_per_param(self, owner: str, params: list[Tensor], masks, default: str | None) -> list[Tensor]:
        """Packed words per parameter (local shard, memory order), every mask validated first."""
        chosen = self._resolve(owner, params, masks)
        missing = [self.param_name(p) for p, m in zip(params, chosen) if m is None]
        if missing and default is None and isinstance(masks, Mapping):
            warnings.warn(f"{owner}: {len(missing)} of {len(params)} parameters have no mask and are "
                          f"trained on all elements: {missing[:5]}{' ...' if len(missing) > 5 else ''}. "
                          "Pass default='train' or default='freeze' to say which you mean.",
                          UserWarning, stacklevel=3)
        fill = "train" if default is None else default
        return [_mask_state.full_words(local(p).numel(), fill == "train", local(p).device) if m is None
                else _mask_state.local_mask(owner, self.param_name(p), p, m)
                for p, m in zip(params, chosen)]

    @torch.no_grad()
    def update_masks(self, masks: Sequence | Mapping, *, default: str = "keep") -> None:
        """Changes the masks of a running optimizer, migrating each parameter's compact state in
        one pass over its old and new mask: elements active in both keep their m and v, newly
        active elements start from m = v = 0, dropped elements release theirs; the step count
        (and so the bias correction) stays. Afterwards each parameter holds 8 B per active element
        plus its mask words and block offsets (0.133 B per element), as if built with the new mask.

        masks: as for the constructor. Parameters left out (None in a sequence, absent from a
        mapping) follow `default`: "keep" their current mask, "train" all elements, "freeze" none.
        Under FSDP2 every rank calls it with the same masks (each keeps its shard's part).

        All masks are validated and packed before any state changes, so a bad mask (wrong shape,
        dtype or placement, an unknown key) leaves parameters, state and masks exactly as they
        were. The migration then replaces one parameter's state at a time (peak: the old and new
        state of one parameter, not of the model); only running out of memory can stop it part
        way, and then every parameter holds either its old state or its new one, consistently.

        A newly active element meets the running step's bias correction with m = v = 0, so once
        1 - beta2^t is near 1 its first updates are larger than Adam's first step:
        (1-beta1)/sqrt(1-beta2) = 3.2x lr at the default betas, up to ~6.5x over the next ten
        steps, as for any Adam state reset mid-run (early in a run they are smaller: 0.48x at step
        11, 1.02x at step 110)."""
        owner = f"{type(self).__name__}.update_masks"
        if default not in ("keep",) + DEFAULTS:
            raise ValueError(f"{owner}: default must be 'keep', 'train' or 'freeze', got {default!r}")
        params = self._all_params()
        chosen = self._resolve(owner, params, masks)
        words: list[Tensor | None] = []
        for p, m in zip(params, chosen):  # validate and pack everything before any write
            if m is not None:
                words.append(_mask_state.local_mask(owner, self.param_name(p), p, m))
            elif default == "keep":
                words.append(None)
            else:
                words.append(_mask_state.full_words(local(p).numel(), default == "train", local(p).device))
        for p, w in zip(params, words):
            if w is None:
                continue
            state, n = self.state.get(p), local(p).numel()
            if not state or MASK_KEY not in state:  # a parameter added after construction
                self.state[p] = _mask_state.state_from_words(w, n)
            else:
                self.state[p] = _mask_state.migrate(state, w, n)

    def active_counts(self) -> list[int]:
        """Active (trained) elements per parameter (of the local shard), over all groups in order."""
        return [self.state[p]["exp_avg"].numel() for p in self._all_params()]

    # ---- the step ------------------------------------------------------------------------------

    def _plan_group(self, group, items: list[Item]):
        owner = type(self).__name__
        beta1, beta2 = group["betas"]
        lr = lr_value(owner, group["lr"])
        check_hyper(owner, lr, eps=group["eps"], betas=(beta1, beta2), weight_decay=group["weight_decay"])
        work = []
        for it in items:
            state = self.state.get(it.param)
            if not state or MASK_KEY not in state:
                raise RuntimeError(f"{owner}.step: parameter {self.param_name(it.param)} has no mask "
                                   "state (added after construction? give it one with update_masks)")
            step = self._step_value(it.param, state)
            if state["exp_avg"].numel() > 0:  # else nothing trained in this tensor
                work.append((it, state, step + 1))

        skip = finite_mode(owner, group["check_finite"]) == "skip"
        grad_scale = self._grad_scale

        hyper = (float(lr), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]))

        def run() -> None:
            kernels = {}  # device -> the native kernel or None
            for it, state, step in work:
                args = (it.work_param, it.work_grad, state[MASK_KEY], state[OFFSETS_KEY], state["exp_avg"],
                        state["exp_avg_sq"])
                # The group's hyperparameters, the step count and the gradient's shape are checked
                # above; a native kernel checks the rest itself, so it is called without the typed
                # wrapper's Python checks (~25 us a parameter).
                device = it.work_param.device
                if device not in kernels:
                    kernels[device] = ops.native_kernel("masked_adamw_step_", device)
                native = kernels[device]
                if native is not None:
                    bad = native(*args, float(step), *hyper, skip, grad_scale, None)
                else:
                    bad = ops.masked_adamw_step_(*args, step, *hyper, skip, grad_scale)
                if skip:
                    self._nonfinite.append((it.param, bad))
            if work:  # one op for every count, not a tensor += 1 per parameter
                torch._foreach_add_([state["step"] for _, state, _ in work], 1.0)

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
        warn_nonfinite(type(self).__name__, hits)

    @property
    def nonfinite_counts(self) -> list[int]:
        """Per parameter stepped last step (check_finite="skip"), the active elements whose gradient
        was NaN or inf and that were left untouched."""
        return [int(c) for _, c in getattr(self, "_nonfinite", [])]

    # ---- checkpoints -----------------------------------------------------------------------------

    def _float_state_like(self, p: Tensor, value: Tensor):
        return value  # compact: one entry per active element of the local shard, never a DTensor

    def _pack_state_dict(self, sd: dict) -> dict:
        """A DTensor parameter's compact state and mask go into one per-rank blob
        (_shard_state explains why), so torch.distributed.checkpoint keeps every rank's."""
        ids = list(chain.from_iterable(g["params"] for g in sd["param_groups"]))
        raw = {k: dict(v) for k, v in sd.get(RAW_KEY, {}).items()}
        state = dict(sd["state"])
        for idx, p in zip(ids, self._all_params()):
            if not hasattr(p, "to_local") or idx not in state:
                continue
            st = dict(state[idx])
            tensors = {k: st.pop(k) for k in self.FLOAT_STATE if k in st}
            tensors |= {k: raw[k].pop(idx) for k in self.RAW_STATE if idx in raw.get(k, {})}
            st[_shard_state.rank_key()] = _shard_state.pack(p, tensors)
            state[idx] = st
        sd["state"] = state
        raw = {k: v for k, v in raw.items() if v}
        if raw:
            sd[RAW_KEY] = raw
        else:
            sd.pop(RAW_KEY, None)
        return sd

    def load_state_dict(self, state_dict) -> None:
        """torch's load, plus: the per-rank blob of a DTensor parameter is unpacked (this rank's;
        refused by name when it was saved for another shard or world size)."""
        owner = f"{type(self).__name__}.load_state_dict"
        sd = dict(state_dict)
        groups = sd.get("param_groups", [])
        ids = list(chain.from_iterable(g["params"] for g in groups))
        params = self._all_params()
        if len(ids) != len(params):
            return super().load_state_dict(state_dict)  # the base names the size mismatch
        id_map = dict(zip(ids, params))
        raw = {k: dict(v) for k, v in sd.get(RAW_KEY, {}).items()}
        state = _merge_dcp_strings(dict(sd.get("state", {})), id_map)
        mine = _shard_state.rank_key()
        for idx, st in list(state.items()):
            if not isinstance(st, Mapping) or idx not in id_map:
                continue
            p, name = id_map[idx], self.param_name(id_map[idx])
            shard_keys = sorted(k for k in st if _shard_state.is_shard_key(k))
            sharded = hasattr(p, "to_local")
            if not shard_keys:
                if sharded and "exp_avg" in st:
                    raise ValueError(f"{owner}: parameter {name} is a DTensor shard here but the checkpoint "
                                     "holds its whole compact state (saved without FSDP2); MaskedAdamW "
                                     "cannot reshard compact state: rebuild it from the masks instead")
                continue
            if not sharded:
                raise ValueError(f"{owner}: the checkpoint holds per-rank (FSDP2) state {shard_keys} for "
                                 f"parameter {name}, which is a whole tensor here; MaskedAdamW's compact "
                                 "state resumes only with the sharding it was saved with")
            if mine not in st:
                raise ValueError(f"{owner}: the checkpoint holds the compact state of parameter {name} "
                                 f"for {shard_keys}, none for this process ({mine}); it resumes only on "
                                 "the world size it was saved with")
            tensors = _shard_state.unpack(owner, name, p, st[mine], mine)
            st = {k: v for k, v in st.items() if not _shard_state.is_shard_key(k)}
            st |= {k: tensors[k] for k in self.FLOAT_STATE if k in tensors}
            for k in self.RAW_STATE:
                if k in tensors:
                    raw.setdefault(k, {})[idx] = tensors[k]
            state[idx] = st
        sd["state"] = state
        if raw:
            sd[RAW_KEY] = raw
        super().load_state_dict(sd)

    def _check_param_state(self, p, name, floats, raws, has_step) -> None:
        owner = f"{type(self).__name__}.load_state_dict"
        words, offsets = raws.get(MASK_KEY), raws.get(OFFSETS_KEY)
        if words is None or offsets is None:
            raise ValueError(f"{owner}: the checkpoint has no mask for parameter {name}; it was not "
                             "saved by MaskedAdamW")
        n = local(p).numel()
        for key, value, want in ((MASK_KEY, words, (ref.num_mask_words(n), torch.int32)),
                                 (OFFSETS_KEY, offsets, (ref.num_offset_blocks(n), torch.int64))):
            if (value.numel(), value.dtype) != want:
                raise ValueError(f"{owner}: {key} for parameter {name} has {value.numel()} {value.dtype} "
                                 f"entries, expected {want[0]} {want[1]}; was the checkpoint saved from "
                                 "a different model?")
        if n % 32 and int(words[-1].item()) & ~((1 << (n % 32)) - 1) & 0xFFFFFFFF:
            raise ValueError(f"{owner}: the mask of parameter {name} has bits set past its {n} elements")
        counts = ref.mask_block_counts(words, n)
        if not torch.equal(offsets, torch.cumsum(counts, 0) - counts):
            raise ValueError(f"{owner}: block_offsets of parameter {name} do not match its mask")
        k = int(counts.sum())
        for key in ("exp_avg", "exp_avg_sq"):
            value = floats.get(key)
            if value is None or value.numel() != k:
                got = "none" if value is None else f"{value.numel()} entries"
                raise ValueError(f"{owner}: {key} of parameter {name} has {got} but its mask has {k} "
                                 "active elements (MaskedAdamW keeps one per active element)")
            floats[key] = value.reshape(-1).contiguous()


def _merge_dcp_strings(state: dict, id_map: dict) -> dict:
    """torch.distributed.checkpoint.load writes a non-tensor value (our per-rank bytes) back
    through the string form of each key on its path, so a state_dict keyed by parameter ids (0,
    1, ...) gets its loaded blobs under "0", "1", ... beside the template's stale ones, which
    it does not replace (tensors it copies in place). Those string entries are what was loaded:
    they take the place of the template's. (torch's get/set_optimizer_state_dict key the state
    by parameter name and need none of this.)"""
    ids = {str(i): i for i in id_map if not isinstance(i, str)}
    for key in [k for k in state if isinstance(k, str) and k in ids]:
        loaded = state[key]
        if isinstance(loaded, Mapping) and loaded and all(_shard_state.is_shard_key(k) for k in loaded):
            del state[key]
            state[ids[key]] = {**state.get(ids[key], {}), **loaded}
    return state
