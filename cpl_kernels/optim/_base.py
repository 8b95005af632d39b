"""Shared machinery of every cpl_kernels optimizer: DTensor-local views, memory-order views of any
parameter layout, argument checks, clear errors naming the parameter, the non-finite gradient
guard, state_bytes, and a state_dict that round-trips bit-exactly and stays loadable by
torch.optim.

All or nothing: step(), load_state_dict() and set_reference_from_grads() validate everything
first and write afterwards, so an error leaves parameters, optimizer state and codes exactly as
they were.

Checkpoint layout: per-parameter state holds only torch's own keys ('step', 'exp_avg',
'exp_avg_sq', 'momentum_buffer'), so torch.optim.AdamW/Adam/SGD load it as their own. Integer
state (sign codes, mask words, block offsets) lives under the top-level key RAW_KEY, which
torch.optim ignores: torch's load_state_dict casts every non-'step' tensor to the parameter's
dtype, and an int32 code word does not survive a trip through fp32 (24-bit mantissa), let alone
bf16. For the same reason fp32 state is kept out of that cast on load (a bf16 parameter's
exp_avg would lose 16 bits). SHAPES_KEY records each parameter's shape, so a checkpoint from
another model is refused by name instead of training on misplaced state.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from itertools import chain

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _layout
from ._options import _REFUSED, check_args, finite_mode

RAW_KEY = "cpl_raw_state"
SHAPES_KEY = "cpl_param_shapes"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

def local(t):
    """The local shard of a DTensor (FSDP2, tensor parallel), the tensor itself otherwise.
    Under no_grad, DTensor.to_local() returns the stored shard, so in-place writes reach it."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def like_param(p: Tensor, local_tensor: Tensor):
    """Wraps state built from the local shard as a DTensor sharded like `p`, so that distributed
    checkpointing sees optimizer state shaped like the parameter (as torch.optim's own)."""
    if hasattr(p, "to_local"):
        from torch.distributed.tensor import DTensor
        return DTensor.from_local(local_tensor, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())
    return local_tensor


def tensor_bytes(value) -> int:
    if isinstance(value, Tensor):
        t = local(value)
        return t.numel() * t.element_size()
    return 0


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes held by the tensors of any optimizer's state (local shards for DTensors)."""
    return sum(tensor_bytes(v) for st in optimizer.state.values() if isinstance(st, Mapping)
               for v in st.values())


def warn_nonfinite(owner: str, hits: list[tuple[str, int]]) -> None:
    """check_finite="skip": one RuntimeWarning naming the parameters (name, count) whose non-finite
    gradient elements the step left untouched (stacklevel: the caller of opt.step())."""
    if not hits:
        return
    listing = ", ".join(f"{name} ({count})" for name, count in hits[:8])
    more = f" and {len(hits) - 8} more" if len(hits) > 8 else ""
    warnings.warn(f"{owner}.step: non-finite gradient elements were left untouched (no update, no state "
                  f"change) in {len(hits)} parameter(s): {listing}{more}. check_finite='raise' refuses such "
                  "steps instead.", RuntimeWarning, stacklevel=6)


class Item:
    """One parameter stepped this step: the parameter, its local shard and gradient, and the
    memory-order tensors the kernels work on: the tensors themselves when both are contiguous
    (the kernels take any contiguous shape), else 1-D views in the parameter's memory order, or
    copies written back for layouts with gaps."""

    __slots__ = ("param", "local", "grad", "work_param", "work_grad", "copy_back")

    def __init__(self, param: Tensor, grad: Tensor):
        self.param, self.local, self.grad = param, local(param), local(grad)
        if self.local.is_contiguous() and self.grad.is_contiguous():
            # No views: a view costs ~2 us of Python, and a step made four a parameter (0.3 ms a
            # step for a 35-tensor model).
            self.copy_back, self.work_param, self.work_grad = False, self.local, self.grad
            return
        self.copy_back = not _layout.dense(self.local)
        self.work_param = (self.local.contiguous().view(-1) if self.copy_back
                           else _layout.flat(self.local))
        self.work_grad = _layout.flat_in_layout_of(self.grad, self.local)

    def write_back(self) -> None:
        if self.copy_back:
            self.local.copy_(self.work_param.view(self.local.shape))


class StateOptimizer(Optimizer):
    """torch.optim.Optimizer plus the bookkeeping every cpl_kernels optimizer shares.

    Subclasses set FLOAT_STATE (fp32 state keys, kept out of torch's dtype cast on load),
    RAW_STATE (integer state kept bit-exact), LOCAL_STATE (fp32 keys of per-shard state, such as
    8-bit absmax, kept as plain local tensors), KEEP_GROUP_KEYS (group options torch.optim does not
    know, kept when a torch checkpoint is loaded), and implement _plan_group (validate and return
    the writes to do) and _check_param_state (is a checkpoint's state right for this parameter).
    """

    FLOAT_STATE: tuple[str, ...] = ()
    RAW_STATE: tuple[str, ...] = ()
    LOCAL_STATE: tuple[str, ...] = ()  # FLOAT_STATE keys not shaped like the param: never DTensors
    KEEP_GROUP_KEYS: tuple[str, ...] = ("check_finite",)
    DEFAULT_FINITE: str | bool = "raise"

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self._install_hooks()

    # ---- parameters ----------------------------------------------------------------------------

    def add_param_group(self, param_group) -> None:
        """torch's add_param_group, refusing dtypes the kernels do not step (before the group is
        kept, so a refused group leaves the optimizer as it was)."""
        before = len(self.param_groups)
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"] if len(self.param_groups) > before else []:
            if p.dtype not in SUPPORTED_DTYPES:
                bad = self.param_name(p)
                del self.param_groups[-1]
                allowed = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
                raise TypeError(f"{type(self).__name__}: parameter {bad} has dtype "
                                f"{str(p.dtype).replace('torch.', '')}; supported: {allowed} "
                                "(optimizer state is fp32 whatever the parameter dtype)")

    def param_name(self, p: Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for i, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    if names:
                        return repr(names[i])
                    return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"
        return f"<parameter of shape {tuple(p.shape)} not in this optimizer>"

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _param_names(self) -> list[str | None]:
        """The name of every parameter over all groups in order (None where none was given)."""
        out: list[str | None] = []
        for group in self.param_groups:
            names = group.get("param_names")
            out.extend(names if names else [None] * len(group["params"]))
        return out

    # ---- the step ------------------------------------------------------------------------------

    def _collect(self) -> list[list[Item]]:
        """Per group, an Item for every param that has a gradient (nothing written)."""
        return [[self._item(p) for p in group["params"] if p.grad is not None]
                for group in self.param_groups]

    def _item(self, p: Tensor) -> Item:
        """The Item stepping p with its .grad (not None), validated (nothing written)."""
        g = p.grad
        if g.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; "
                               f"parameter {self.param_name(p)} has one (use a dense embedding)")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{type(self).__name__}.step: parameter {self.param_name(p)} has "
                            f"dtype {p.dtype}, which the kernels do not step")
        if g.dtype != p.dtype or g.shape != p.shape:
            raise ValueError(f"{type(self).__name__}.step: the gradient of parameter "
                             f"{self.param_name(p)} has dtype {g.dtype} and shape "
                             f"{tuple(g.shape)}; the parameter has {p.dtype}, {tuple(p.shape)}")
        return Item(p, g)

    def _check_finite(self, work: list[list[Item]]) -> None:
        """Raises before anything is written when a gradient holds NaN or inf (one host sync).

        Why raise rather than step: a NaN reaching Adam's state poisons it forever, and a CPL
        sign test on NaN counts as collaborative, so the NaN would be written into the weights."""
        checked = [it for group, items in zip(self.param_groups, work)
                   if finite_mode(type(self).__name__, group["check_finite"]) == "raise"
                   for it in items if it.grad.numel() > 0]
        if not checked:
            return
        # A fp32 sum is NaN or inf when an element is, and also when finite elements overflow it
        # (|sum| > 3.4e38): such tensors get an exact isfinite() before any verdict. One
        # vectorised read per gradient, 8x faster than the inf-norm on CPU (16M fp32: 6.9 ms vs
        # 59 ms; a fused AdamW step on those is ~9 ms), and no private torch API.
        sums = [it.work_grad.sum(dtype=torch.float32) for it in checked]
        device = sums[0].device
        if bool(torch.stack([s.to(device) for s in sums]).isfinite().all()):
            return
        for it, s in zip(checked, sums):
            if not bool(s.isfinite()) and not bool(it.work_grad.isfinite().all()):
                raise FloatingPointError(
                    f"{type(self).__name__}.step: the gradient of parameter {self.param_name(it.param)} "
                    "holds NaN or inf; nothing was updated (no parameter, no optimizer state). Skip this "
                    "batch, lower the learning rate, or use torch.amp.GradScaler (which skips such "
                    "steps itself); check_finite='skip' steps the finite elements only, False "
                    "disables this check.")

    def _step_value(self, p: Tensor, state) -> float:
        """The step count stored for p (0 before its first step), validated."""
        step = state.get("step", 0.0) if isinstance(state, dict) or isinstance(state, Mapping) else 0.0
        value = float(step.item() if isinstance(step, Tensor) else step)
        if not (0 <= value < math.inf and value == int(value)):
            raise ValueError(f"{type(self).__name__}: parameter {self.param_name(p)} has step count "
                             f"{value!r} in its state; a step count is a whole number >= 0")
        return value

    # torch.amp.GradScaler hands this optimizer `grad_scale` and `found_inf` attributes instead of
    # unscaling the gradients in a separate pass (torch's fused optimizers' protocol).
    _step_supports_amp_scaling = True
    # The cpl_kernels.optim.in_backward.InBackward attached to this optimizer (None: step() steps).
    _cpl_in_backward = None

    def _amp(self) -> tuple[Tensor | None, bool]:
        """(grad_scale to divide gradients by, whether GradScaler found inf/NaN: skip the step).
        found_inf is read on the host: one sync on CUDA, as the step counts live on the CPU."""
        found_inf = getattr(self, "found_inf", None)
        skip = found_inf is not None and bool(found_inf.item() != 0)
        return getattr(self, "grad_scale", None), skip

    # Dynamo would specialise on the float step counts and recompile every step (hitting its
    # recompile limit after 8): a compiled training step runs the optimizer step eagerly instead.
    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure=None):
        if self._cpl_in_backward is not None:  # cpl_kernels.in_backward: the steps ran in backward
            raise RuntimeError(self._cpl_in_backward.step_refusal())
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._grad_scale, skip = self._amp()
        if skip:
            return loss  # GradScaler saw inf/NaN: nothing is written, as torch's fused AdamW
        work = self._collect()
        plans = [self._plan_group(group, items) for group, items in zip(self.param_groups, work)]
        self._check_finite(work)
        self._begin_step()
        for plan in plans:
            plan()
        for it in chain.from_iterable(work):
            it.write_back()
        self._end_step()
        return loss

    def _begin_step(self) -> None:
        pass

    def _end_step(self) -> None:
        pass

    def _plan_group(self, group, items: list[Item]) -> Callable[[], None]:
        """Validates one group's step and returns the function that performs it; writes nothing."""
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes held in optimizer state: every state tensor (local shard), codes/masks included."""
        return state_bytes(self)

    # ---- checkpoints ---------------------------------------------------------------------------

    def _install_hooks(self) -> None:
        # A post-hook registered first, so that users' state_dict post-hooks see the checkpoint
        # as it is saved (codes under RAW_KEY, not inside the per-parameter state).
        if _split_raw_state not in self._optimizer_state_dict_post_hooks.values():
            self.register_state_dict_post_hook(_split_raw_state, prepend=True)

    def load_state_dict(self, state_dict) -> None:
        owner = f"{type(self).__name__}.load_state_dict"
        sd = dict(state_dict)
        raw = {k: dict(v) for k, v in sd.pop(RAW_KEY, {}).items()}
        shapes = dict(sd.pop(SHAPES_KEY, {}))
        groups = list(sd["param_groups"])
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError(f"{owner}: the checkpoint has param groups of sizes "
                             f"{[len(g['params']) for g in groups]}, this optimizer "
                             f"{[len(g['params']) for g in self.param_groups]}")
        for g in groups:
            check_args(type(self).__name__, **{k: g[k] for k in _REFUSED if k in g})
        self._check_group_kind(groups)
        id_map = dict(zip(chain.from_iterable(g["params"] for g in groups), self._all_params()))
        torch_state, kept = {}, {}
        for idx, st in sd["state"].items():
            if idx not in id_map or not isinstance(st, Mapping):
                torch_state[idx] = st  # not a parameter's state: torch copies it as is
                continue
            st = dict(st)
            for key in self.RAW_STATE:
                value = st.pop(key, None)
                # Integer state inside the per-param dict came through an exporter that kept it;
                # a float copy was cast by torch.optim and can no longer be trusted: drop it.
                if isinstance(value, Tensor) and not value.is_floating_point():
                    raw.setdefault(key, {})[idx] = value
            kept[idx] = {k: st.pop(k) for k in self.FLOAT_STATE if isinstance(st.get(k), Tensor)}
            torch_state[idx] = st
        for key, per_param in raw.items():
            if key not in self.RAW_STATE:
                raise ValueError(f"{owner}: the checkpoint holds '{key}' state, which "
                                 f"{type(self).__name__} does not use; it was saved by another kind "
                                 "of optimizer")
            unknown = [idx for idx in per_param if idx not in id_map]
            if unknown:
                raise ValueError(f"{owner}: '{key}' state for parameter ids {unknown} that the "
                                 "checkpoint's param groups do not list")
        # Validate every parameter before anything is written.
        installs: dict[Tensor, dict[str, Tensor]] = {}
        for idx, p in id_map.items():
            name = self.param_name(p)
            if idx in shapes and tuple(shapes[idx]) != tuple(p.shape):
                raise ValueError(f"{owner}: the checkpoint's parameter {idx} had shape "
                                 f"{tuple(shapes[idx])} but parameter {name} has shape "
                                 f"{tuple(p.shape)}; was it saved from a different model?")
            st = torch_state.get(idx, {})
            unknown = [k for k in st if k != "step"]
            if unknown:
                raise ValueError(f"{owner}: the state of parameter {name} holds {unknown}, which "
                                 f"{type(self).__name__} does not use; the checkpoint was saved by "
                                 "another kind of optimizer")
            if "step" in st:
                self._step_value(p, st)
            floats = {k: local(v).detach().to(device=local(p).device, dtype=torch.float32)
                      for k, v in kept.get(idx, {}).items()}
            raws = {k: per_param[idx].to(local(p).device).reshape(-1).contiguous().clone()
                    for k, per_param in raw.items() if idx in per_param}
            self._check_param_state(p, name, floats, raws, has_step="step" in st)
            installs[p] = {k: v if k in self.LOCAL_STATE else self._float_state_like(p, v)
                           for k, v in floats.items()} | raws
        keep = [{k: g[k] for k in self.KEEP_GROUP_KEYS if k in g} for g in self.param_groups]
        sd["state"] = torch_state
        super().load_state_dict(sd)
        for group, values in zip(self.param_groups, keep):
            for k, v in values.items():
                group.setdefault(k, v)
        for p, values in installs.items():
            st = self.state[p]
            st.update(values)
            if isinstance(st.get("step"), Tensor):  # torch's fused/capturable keep it on device
                st["step"] = st["step"].to("cpu", torch.float32)
            if not st:
                del self.state[p]
        self._after_load()

    def _float_state_like(self, p: Tensor, value: Tensor):
        """fp32 state loaded for p as it is kept: sharded like p (a DTensor) for DTensor params."""
        return like_param(p, value)

    def _pack_state_dict(self, sd: dict) -> dict:
        """Last touch to a state_dict (after the raw state is split out): identity by default."""
        return sd

    def _check_group_kind(self, groups: list[dict]) -> None:
        """Refuses a checkpoint saved by an optimizer whose update rule differs (e.g. Adam vs
        AdamW): its state would load and then train under the wrong rule."""

    def _check_param_state(self, p: Tensor, name: str, floats: dict[str, Tensor],
                           raws: dict[str, Tensor], has_step: bool) -> None:
        """Raises when a checkpoint's state cannot belong to parameter p (names it)."""

    def _after_load(self) -> None:
        pass

    def __getstate__(self):
        state = super().__getstate__()
        state.update({k: v for k, v in self.__dict__.items() if k in self._PICKLED})
        return state

    _PICKLED: tuple[str, ...] = ()

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("check_finite", self.DEFAULT_FINITE)
        self._install_hooks()


def _split_raw_state(optimizer: StateOptimizer, sd: dict) -> dict:
    """state_dict post-hook: moves integer state out of the per-parameter dicts (see the module
    docstring) and records every parameter's shape."""
    raw: dict[str, dict[int, Tensor]] = {}
    torch_state = {}
    for idx, st in sd["state"].items():
        if not isinstance(st, Mapping):
            torch_state[idx] = st
            continue
        st = dict(st)  # torch hands out the live per-param dicts: do not mutate them
        for key in optimizer.RAW_STATE:
            if key in st:
                raw.setdefault(key, {})[idx] = st.pop(key)
        if st:
            torch_state[idx] = st
    sd["state"] = torch_state
    if raw:
        sd[RAW_KEY] = raw
    ids = chain.from_iterable(g["params"] for g in sd["param_groups"])
    sd[SHAPES_KEY] = {i: list(p.shape) for i, p in zip(ids, optimizer._all_params())}
    return optimizer._pack_state_dict(sd)
