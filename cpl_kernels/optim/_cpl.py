"""CPLOptimizer: the reference (2-bit sign codes per parameter) and the conflicting-element counts
shared by CPLAdam, CPLAdamW and CPLSGD."""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .. import engine, ops
from .. import reference as ref
from . import _layout
from ._base import Item, StateOptimizer, like_param, local, warn_nonfinite
from ._options import finite_mode, lr_value

CODES_KEY = "cpl_codes"
CRITERIA = ("update", "gradient")


def check_criterion(owner: str, criterion: str, strict: bool) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"{owner}: criterion must be one of {CRITERIA}, got {criterion!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"{owner}: strict must be a bool, got {strict!r}")


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class CPLOptimizer(StateOptimizer):
    """Holds the mastered reference as 2-bit sign codes (state key CODES_KEY, int32, ceil(n/16)
    words per parameter: 0.25 B/element, in the parameter's memory order) and the conflicting
    counts of the last step.

    A parameter without codes has no reference: every element is collaborative (as codes of
    zeros would say) and the step is the plain optimizer's."""

    RAW_STATE = (CODES_KEY,)
    KEEP_GROUP_KEYS = ("criterion", "strict", "check_finite")
    DEFAULT_FINITE = "skip"
    COUNTS_STEPS = False  # keeps torch's per-parameter 'step' (Adam's bias corrections)
    _PICKLED = ("_frozen", "_stepped", "_nonfinite", "_reference_was_set", "_warned_no_reference")

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self._frozen: list[list[Tensor]] = []   # per group: 0-dim int64 counts, read lazily
        self._stepped: list[int] = []           # per group: elements stepped last step
        self._nonfinite: list[list[tuple[Tensor, Tensor]]] = []  # per group: (params, counts)
        self._reference_was_set = False
        self._warned_no_reference = False

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        for key, default in (("_frozen", []), ("_stepped", []), ("_nonfinite", []), ("_reference_was_set", False),
                             ("_warned_no_reference", False)):
            if key not in self.__dict__:
                setattr(self, key, default)

    # ---- the reference -------------------------------------------------------------------------

    def _reference_sources(self, grads) -> list:
        """The reference gradient of every parameter (None: no reference), validated against the
        keys and sizes of `grads`; nothing is written."""
        owner = f"{type(self).__name__}.set_reference_from_grads"
        params = self._all_params()
        if grads is None:
            return [p.grad for p in params]
        if isinstance(grads, Mapping):
            return self._sources_from_mapping(owner, params, grads)
        if isinstance(grads, Sequence) and not isinstance(grads, (str, bytes)):
            if len(grads) != len(params):
                raise ValueError(f"{owner}: got {len(grads)} gradients for {len(params)} parameters")
            return list(grads)
        raise TypeError(f"{owner}: grads must be None (use .grad), a mapping param/name -> tensor, or "
                        f"a sequence aligned with the optimizer's parameters; got {type(grads).__name__}")

    def _sources_from_mapping(self, owner: str, params: list[Tensor], grads: Mapping) -> list:
        names = self._param_names()
        by_name = {n: i for i, n in enumerate(names) if n is not None}
        by_id = {id(p): i for i, p in enumerate(params)}
        out: list = [None] * len(params)
        seen = [False] * len(params)
        unknown = []
        for key, value in grads.items():
            i = by_id.get(id(key)) if isinstance(key, Tensor) else by_name.get(key) if isinstance(key, str) else None
            if i is None:
                unknown.append(key)
                continue
            out[i], seen[i] = value, True
        if unknown:
            shown = _listing([repr(k) if not isinstance(k, Tensor) else f"<tensor {tuple(k.shape)}>"
                              for k in unknown])
            if not by_name and any(isinstance(k, str) for k in unknown):
                hint = ("this optimizer was built without parameter names (from model.parameters()): "
                        "build it from model.named_parameters() or key the mapping by parameter tensors")
            else:
                hint = "keys must be this optimizer's parameters or their names"
            raise ValueError(f"{owner}: {len(unknown)} key(s) match no parameter of this optimizer: "
                           f"{shown}; {hint}. Nothing was changed.")
        missing = [self.param_name(p) for p, s in zip(params, seen) if not s]
        if missing:
            warnings.warn(f"{owner}: {len(missing)} of {len(params)} parameters get no reference "
                          f"(they will step as plain {self._plain_name()}): {_listing(missing)}",
                          UserWarning, stacklevel=4)
        return out

    @torch.no_grad()
    def set_reference_from_grads(self, grads=None) -> None:
        """Packs the sign of each parameter's reference gradient into its codes.

        grads: None to read each parameter's current .grad (after a backward pass over the mastered
        set, see cpl_kernels.build_reference), or a mapping (param or name -> tensor) or a sequence
        aligned with the parameters. A parameter whose reference gradient is None gets no
        reference: all its elements are collaborative. Keys that match no parameter, and
        gradients whose shape differs from their parameter's, are errors; a mapping that leaves
        parameters out warns with their names. Everything is checked before any code is written."""
        owner = f"{type(self).__name__}.set_reference_from_grads"
        params = self._all_params()
        sources = self._reference_sources(grads)
        packs = []
        for p, g in zip(params, sources):
            if g is None:
                packs.append((p, None))
                continue
            if not isinstance(g, Tensor):
                raise TypeError(f"{owner}: the reference for parameter {self.param_name(p)} is a "
                                f"{type(g).__name__}, not a tensor")
            if g.is_sparse:
                raise RuntimeError(f"{owner}: parameter {self.param_name(p)} has a sparse reference gradient")
            if not g.is_floating_point():
                raise TypeError(f"{owner}: the reference for parameter {self.param_name(p)} has dtype "
                                f"{g.dtype}; it must be a floating-point gradient")
            lp, lg = local(p), local(g)
            if lg.numel() != lp.numel():
                raise ValueError(
                    f"{owner}: the reference gradient for parameter {self.param_name(p)} has "
                    f"{lg.numel()} elements but the parameter has {lp.numel()}; was it computed on a "
                    "different model?")
            if lg.shape != lp.shape:
                raise ValueError(f"{owner}: the reference gradient for parameter {self.param_name(p)} "
                                 f"has shape {tuple(lg.shape)} but the parameter has shape {tuple(lp.shape)}")
            if lg.device != lp.device:
                raise ValueError(f"{owner}: the reference gradient for parameter {self.param_name(p)} "
                                 f"is on {lg.device} but the parameter is on {lp.device}")
            packs.append((p, lg))
        for p, lg in packs:  # all checked: now write
            if lg is None:
                self._drop_codes(p)
                continue
            lp = local(p)
            if lg.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                lg = lg.float()  # fp64: only the sign is kept
            state = self.state[p]
            codes = state.get(CODES_KEY)
            if codes is None:  # allocated once, rewritten in place at every refresh
                codes = state[CODES_KEY] = ops.empty_codes(lp)
            ops.pack_signs_(_layout.flat_in_layout_of(lg.detach(), lp), codes)
        self._reference_was_set = True

    def _drop_codes(self, p: Tensor) -> None:
        state = self.state.get(p)
        if state is not None and CODES_KEY in state:
            del state[CODES_KEY]
            if not state:
                del self.state[p]

    def clear_reference(self) -> None:
        """Drops every parameter's codes: the optimizer becomes its torch.optim counterpart."""
        for p in self._all_params():
            self._drop_codes(p)
        self._reference_was_set = True  # deliberate: no "no reference" warning from now on

    @property
    def has_reference(self) -> bool:
        return any(isinstance(st, Mapping) and CODES_KEY in st for st in self.state.values())

    def _plain_name(self) -> str:
        return type(self).__name__.removeprefix("CPL")

    # ---- checkpoints -----------------------------------------------------------------------------

    def _check_param_state(self, p, name, floats, raws, has_step) -> None:
        owner = f"{type(self).__name__}.load_state_dict"
        lp = local(p)
        for key, value in floats.items():
            if value.shape != lp.shape:
                raise ValueError(f"{owner}: '{key}' of parameter {name} has shape {tuple(value.shape)} "
                                 f"but the parameter has shape {tuple(lp.shape)}; was the checkpoint "
                                 "saved from a different model or another kind of optimizer?")
        codes = raws.get(CODES_KEY)
        if codes is not None:
            want = ref.num_code_words(lp.numel())
            if codes.dtype != torch.int32 or codes.numel() != want:
                raise ValueError(
                    f"{owner}: the sign codes for parameter {name} hold {codes.numel()} {codes.dtype} "
                    f"words but its {lp.numel()} elements need {want} int32 words; was the checkpoint "
                    "saved from a different model?")

    def _after_load(self) -> None:
        if self.has_reference:
            self._reference_was_set = True

    # ---- the step --------------------------------------------------------------------------------

    # ---- the step: one engine call per (group, bucket) -------------------------------------------

    def _kind(self, group) -> str:
        """The engine kind (cpl_kernels/kinds.py) this group steps with."""
        raise NotImplementedError

    def _state_keys(self, group) -> tuple[str, ...]:
        """The state keys filling the engine's state slots, in slot order."""
        raise NotImplementedError

    def _hyper(self, group, fresh: bool) -> list[float]:
        """The kind's hyper list for this group; `fresh`: the state was created this step."""
        raise NotImplementedError

    def _check_group(self, owner: str, group, lr: float) -> None:
        """Validates the group's hyperparameters (the step raises before writing anything)."""

    def _item_state(self, owner: str, it: Item, state, keys: tuple[str, ...],
                    installs: list) -> tuple[str, list[Tensor], bool]:
        """(state format, the engine's state tensors, whether they were created now) for one item;
        new or relaid state goes to `installs`, nothing is written. fp32 state here: one tensor per
        key, shaped and laid out like the parameter (CPLAdamW8bit adds the 8-bit format)."""
        slots, fresh = [], False
        shape = it.local.shape
        for key in keys:
            value = state.get(key)
            if value is None:
                fresh = True
                value = like_param(it.param, _layout.new_like(it.local))
                installs.append((it.param, key, value))
            t = local(value)
            if t.shape != shape or t.dtype != torch.float32:
                raise ValueError(f"{owner}.step: '{key}' of parameter {self.param_name(it.param)} has "
                                 f"shape {tuple(t.shape)} and dtype {t.dtype}; expected fp32 of shape "
                                 f"{tuple(shape)}")
            if it.work_param is it.local and t.is_contiguous():  # the common case: t as it is
                slots.append(t)
                continue
            if not _layout.same_layout(t, it.local):
                value = like_param(it.param, _layout.relaid(t, it.local))
                installs.append((it.param, key, value))
                t = local(value)
            slots.append(_layout.working(t, it.work_param))
        return "fp32", slots, fresh

    def _engine_step(self, fmt: str, params: list[Tensor], grads: list[Tensor], slots: list[list[Tensor]],
                     codes: list, kind: str, step: float, lr, hyper: list[float], group, mode,
                     grad_scale) -> Tensor:
        """One engine call over a bucket; slots[k] are the k-th state tensors of each item."""
        n_keys = len(slots[0]) if slots else 0
        return engine.cpl_step_(params, grads, [s[0] for s in slots] if n_keys >= 1 else [],
                                [s[1] for s in slots] if n_keys >= 2 else [], codes, kind, step, lr, hyper,
                                group["criterion"], group["strict"], mode is not False, grad_scale, None)

    def _engine_calls(self, group, fresh: bool, bucket: list, grad_scale):
        """The engine calls stepping one bucket (entries (item, state slots, codes) sharing a step
        count): (entries, hyper) pairs, evaluated lazily as the step runs. One call for the whole
        bucket; a kind with a per-tensor hyperparameter (MoFO's threshold) makes one per entry."""
        return [(bucket, self._hyper(group, fresh))]

    def _plan_group(self, group, items: list[Item]):
        owner = type(self).__name__
        lr = lr_value(owner, group["lr"])
        self._check_group(owner, group, lr)
        check_criterion(owner, group["criterion"], group["strict"])
        mode = finite_mode(owner, group["check_finite"])
        keys = self._state_keys(group)
        installs: list[tuple[Tensor, str, object]] = []
        # One engine call per distinct (step count, fresh state, state format): Adam's bias
        # corrections and SGD's first-step buffer are per call.
        buckets: dict[tuple[float, bool, str], list] = {}
        for it in items:
            state = self.state.get(it.param, {})
            step = self._step_value(it.param, state) if self.COUNTS_STEPS else 0.0
            fmt, slots, fresh = self._item_state(owner, it, state, keys, installs)
            if self.COUNTS_STEPS and "step" not in state:
                installs.append((it.param, "step", torch.tensor(0.0, dtype=torch.float32)))
            buckets.setdefault((step + 1, fresh, fmt), []).append((it, slots, state.get(CODES_KEY)))
        grad_scale = self._grad_scale
        kind = self._kind(group)

        def run() -> None:
            for p, key, value in installs:
                self.state[p][key] = value
            frozen, nonfinite = [], []
            steps = []
            for (step, fresh, fmt), whole in buckets.items():
                for bucket, hyper in self._engine_calls(group, fresh, whole, grad_scale):
                    counts = self._engine_step(
                        fmt, [it.work_param for it, _, _ in bucket], [it.work_grad for it, _, _ in bucket],
                        [s for _, s, _ in bucket], [c for _, _, c in bucket], kind, step, lr, hyper, group,
                        mode, grad_scale)
                    frozen.append(counts[0].sum())
                    nonfinite.append(([it.param for it, _, _ in bucket], counts[1]))
                    if self.COUNTS_STEPS:
                        steps += [self.state[it.param]["step"] for it, _, _ in bucket]
            if steps:  # one op for every count (a tensor += 1 each cost ~5 us of Python a parameter)
                torch._foreach_add_(steps, 1.0)
            self._record(frozen, sum(it.local.numel() for it in items))
            self._nonfinite.append(nonfinite)

        return run

    def _begin_step(self) -> None:
        self._frozen, self._stepped, self._nonfinite = [], [], []
        if not self._reference_was_set and not self._warned_no_reference:
            self._warned_no_reference = True
            warnings.warn(
                f"{type(self).__name__}.step: no reference has been set, so this step is plain "
                f"{self._plain_name()} (nothing is protected). Call cpl_kernels.build_reference(opt, "
                "model, mastered_batches, loss_fn) or opt.set_reference_from_grads(...) first; "
                "opt.clear_reference() marks running without one as intended. Warned once.",
                UserWarning, stacklevel=5)

    def _end_step(self) -> None:
        """check_finite="skip": name the parameters whose non-finite gradient elements were left
        untouched (the counts are host tensors on CPU; on CUDA this is one sync)."""
        hits = [(self.param_name(p), int(c)) for group in self._nonfinite for params, counts in group
                if bool(counts.any()) for p, c in zip(params, counts.tolist()) if c]
        warn_nonfinite(type(self).__name__, hits)

    @property
    def nonfinite_counts(self) -> list[int]:
        """Per param group, the gradient elements of the last step that were NaN or inf and left
        untouched (check_finite="skip")."""
        return [sum(int(c.sum()) for _, c in group) for group in self._nonfinite]

    def _record(self, counts: list[Tensor], numel: int) -> None:
        if counts:
            device = counts[0].device
            self._frozen.append([torch.stack([c.to(device) for c in counts]).sum()])
        else:
            self._frozen.append([])
        self._stepped.append(numel)

    @property
    def frozen_counts(self) -> list[int]:
        """Per param group, the conflicting elements of the last step: frozen (criterion "update"
        or strict "gradient") or whose gradient was zeroed (criterion "gradient", strict=False).
        Read lazily: the .item() sync happens here, not in step()."""
        return [sum(int(c) for c in counts) for counts in self._frozen]

    @property
    def stepped_counts(self) -> list[int]:
        """Per param group, the elements stepped last step (parameters with a gradient)."""
        return list(self._stepped)

    @property
    def frozen_fraction(self) -> float:
        """Conflicting fraction of all elements stepped last step (0.0 before any step)."""
        total = sum(self._stepped)
        return sum(self.frozen_counts) / total if total else 0.0
