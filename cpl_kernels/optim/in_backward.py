"""Steps inside backward: each parameter is stepped (or its reference sign packed) by a hook the
moment its gradient is complete, and the gradient is freed at once.

    from cpl_kernels import CPLAdamW, in_backward

    opt = CPLAdamW(model.parameters(), lr=1e-4, criterion="gradient")
    attached = in_backward(opt)
    for batch in injection_batches:
        with attached.reference_pass():          # the mastered backward packs the codes
            loss_fn(model, mastered_batch).backward()
        loss_fn(model, batch).backward()         # steps every parameter; no opt.step()
    attached.detach()                            # back to opt.step()

Why: a normal step holds every parameter's fp32 gradient (4 B/param) from the backward until
step(), and a per-step reference holds a second full gradient until it is packed. Here a step's
peak holds the gradients of one layer at a time (docs/optimizers.md, "Steps inside backward").

Each hook runs the optimizer's own step path for one parameter: the same validation, the same
engine call (cpl_kernels.engine.cpl_step_, or MaskedAdamW's op) on the same tensors, so the
result equals `step()` bit for bit (tests/test_in_backward.py). What the step-per-parameter
order cannot give is refused, not approximated:
- gradient accumulation over micro-batches: every backward steps; a gradient already present
  when a backward starts, and opt.step() while attached, raise;
- GradScaler: its scaled gradients would be stepped before scaler.step() could unscale them;
  scaler.step(opt) raises (bf16 autocast needs no scaler);
- global-norm clipping: no hook sees all gradients; clip_grad_norm_ after backward finds none
  (it cannot be detected from here: documented). max_grad_norm= clips each parameter's gradient
  by its own norm instead;
- DDP: the hook would see the local gradient before the all-reduce; refused at attach. FSDP2
  calls the hooks on the sharded parameter after its reduce-scatter, and works.

Activation checkpointing works either way: non-reentrant (use_reentrant=False, HF's default) is
plain autograd; a reentrant segment's backward runs as a nested backward of its own, whose hooks
count in the running step or reference pass (a parameter used both inside and outside such a
segment gets its gradient in two parts and raises at the second, by name).

A hook that raises (a non-finite gradient with check_finite="raise", a bad gradient) stops the
backward: the parameters stepped before it in this backward stay stepped, the failing one and
those after it are not (their state untouched), every gradient is freed, and the counts of that
backward are dropped.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import Tensor

from .. import ops
from ._base import StateOptimizer, local
from ._cpl import CODES_KEY, CPLOptimizer
from . import _layout

_ENGINE = torch.autograd.Variable._execution_engine
# Every backward (Tensor.backward, autograd.backward, autograd.grad) runs through this function, on
# the calling thread: how many of its frames are on the stack tells a backward started inside a
# running one (torch.utils.checkpoint with use_reentrant=True runs one per checkpointed segment,
# with a graph task of its own) from a new backward after one that died.
_RUN_BACKWARD = torch.autograd.graph._engine_run_backward.__code__


def _backward_depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        depth += frame.f_code is _RUN_BACKWARD
        frame = frame.f_back
    return depth


def _is_dtensor(p: Tensor) -> bool:
    return hasattr(p, "to_local")


class InBackward:
    """Attaches `optimizer` to the backward of its parameters (see the module docstring).

    max_grad_norm: if set, each parameter's gradient is scaled by min(1, max_grad_norm /
    (norm + 1e-6)) before its step (torch.nn.utils.clip_grad_norm_ on that one parameter), the
    per-parameter stand-in for global-norm clipping.

    Use as a context manager (`with in_backward(opt) as attached:`) or call detach()."""

    def __init__(self, optimizer: StateOptimizer, *, max_grad_norm: float | None = None) -> None:
        owner = "in_backward"
        if not isinstance(optimizer, StateOptimizer):
            raise TypeError(f"{owner}: needs a cpl_kernels optimizer (CPLAdamW, CPLAdam, CPLSGD, CPLLion, "
                            f"MaskedAdamW); got {type(optimizer).__name__}")
        if optimizer._cpl_in_backward is not None:
            raise RuntimeError(f"{owner}: this {type(optimizer).__name__} is already attached; detach() it first")
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                          or not max_grad_norm > 0):
            raise ValueError(f"{owner}: max_grad_norm must be a number > 0 or None, got {max_grad_norm!r}")
        self.optimizer = optimizer
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        params = optimizer._all_params()
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{owner}: a parameter appears twice in the optimizer's param groups")
        self._check_not_ddp(params)
        held = [optimizer.param_name(p) for p in params if p.grad is not None]
        if held:
            raise RuntimeError(f"{owner}: {len(held)} parameter(s) already hold a gradient ({held[0]}, ...); "
                               "it would be stepped together with the next backward's. Step or "
                               "opt.zero_grad() before attaching.")
        self._group_of = {id(p): gi for gi, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self._count = len(params)
        self._handles = []
        self._hooked: set[int] = set()
        for p in params:
            if not p.requires_grad:  # never gets a gradient; one set later is caught by _begin
                continue
            self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
            self._hooked.add(id(p))
            if not _is_dtensor(p):  # FSDP2 writes sharded grads itself: no pre-hook fires there
                self._handles.append(p.register_hook(self._pre_hook(p)))
        # per backward
        self._active = False
        self._tasks: set[int] = set()  # the autograd graph tasks of the backward in progress
        self._depth = 0                # _backward_depth() at its first hook
        self._done: set[int] = set()   # parameters whose hook ran in it
        self._mode = "step"            # "step", "pack" (reference_pass) or "accumulate"
        self._frozen: list[list[Tensor]] = []
        self._stepped: list[int] = []
        self._nonfinite: list[list] = []
        # per reference pass
        self._pass_backwards = 0
        self._packed: set[int] = set()
        self._broken_reference: str | None = None
        # MaskedAdamW unscales through GradScaler.unscale_, which finds no gradient here; this
        # routes scaler.step(opt) to step(), which says why it cannot work.
        self._had_amp_attr = "_step_supports_amp_scaling" in optimizer.__dict__
        self._old_amp_attr = optimizer.__dict__.get("_step_supports_amp_scaling")
        optimizer._step_supports_amp_scaling = True
        optimizer._cpl_in_backward = self

    # ---- attach / detach -----------------------------------------------------------------------

    @staticmethod
    def _check_not_ddp(params: list[Tensor]) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        if any(not _is_dtensor(p) for p in params):
            raise NotImplementedError(
                "in_backward: torch.distributed is initialized with plain (non-DTensor) parameters, as "
                "under DDP, where a hook sees each rank's local gradient before the all-reduce: the "
                "ranks would step on different gradients. Steps in backward support FSDP2 "
                "(fully_shard, DTensor parameters); under DDP call opt.step() as usual.")

    @property
    def attached(self) -> bool:
        return self.optimizer._cpl_in_backward is self

    def detach(self) -> None:
        """Removes the hooks: opt.step() steps again. Idempotent."""
        if not self.attached:
            return
        if self._active and torch._C._current_graph_task_id() != -1:
            raise RuntimeError("in_backward.detach: called during a backward")
        self._finish_pending()
        for h in self._handles:
            h.remove()
        self._handles = []
        opt = self.optimizer
        if self._had_amp_attr:
            opt._step_supports_amp_scaling = self._old_amp_attr
        else:
            del opt._step_supports_amp_scaling
        opt._cpl_in_backward = None

    def __enter__(self) -> InBackward:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def step_refusal(self) -> str:
        """What StateOptimizer.step() raises while attached."""
        opt = self.optimizer
        name = type(opt).__name__
        scaler = getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None
        for attr in ("grad_scale", "found_inf"):  # left by GradScaler: a later plain step must not see them
            opt.__dict__.pop(attr, None)
        if scaler:
            return (f"{name}.step: called by torch.amp.GradScaler while the optimizer steps inside backward "
                    "(cpl_kernels.in_backward): the backward has already stepped every parameter on the "
                    "scaled gradients, which GradScaler can neither unscale nor check for inf. Use bf16 "
                    "autocast (no scaler), or detach() and step normally.")
        return (f"{name}.step: this optimizer steps inside backward (cpl_kernels.in_backward): each "
                "loss.backward() has already stepped every parameter and freed its gradient, so there "
                "is nothing left to step. Remove the step() call (and zero_grad()), or detach() to step "
                "normally. Gradient accumulation over micro-batches cannot work in backward (every "
                "backward steps); accumulate by calling step() normally.")

    # ---- the reference pass --------------------------------------------------------------------

    @contextlib.contextmanager
    def reference_pass(self, *, accumulate: bool = False) -> Iterator[None]:
        """Inside, a backward packs the reference instead of stepping (mastered loss: its sign).

        accumulate=False (a per-step reference, one backward): each hook packs its parameter's
        gradient sign into the codes and frees it, so no mastered gradient outlives its layer. A
        second backward inside the same pass raises before it packs anything (signs cannot be
        summed). accumulate=True (several batches, the per-epoch reference): the backwards
        accumulate into .grad as usual and the codes are packed from the sum when the block
        exits (set_reference_from_grads), then the gradients are freed.

        Parameters that got no gradient get no reference (their codes are dropped), as with
        build_reference. If the block raises: with accumulate=True nothing is packed; with
        accumulate=False the parameters packed so far hold the new reference and the others the
        old one, so stepping refuses until a reference is set again (a new pass,
        set_reference_from_grads or clear_reference)."""
        opt = self.optimizer
        if not isinstance(opt, CPLOptimizer):
            raise TypeError(f"in_backward.reference_pass: {type(opt).__name__} has no reference")
        if not self.attached:
            raise RuntimeError("in_backward.reference_pass: detached; use build_reference / set_reference_from_grads")
        if self._mode != "step":
            raise RuntimeError("in_backward.reference_pass: already inside a reference pass")
        self._finish_pending()
        self._mode = "accumulate" if accumulate else "pack"
        self._pass_backwards, self._packed = 0, set()
        try:
            yield
            if accumulate:
                opt.set_reference_from_grads(None)  # every param: its .grad, or None (no reference)
            else:
                for p in opt._all_params():
                    if id(p) not in self._packed:
                        opt._drop_codes(p)
                opt._reference_was_set = True
            self._broken_reference = None
        except BaseException:
            if not accumulate and self._packed:
                self._broken_reference = (f"the reference pass failed after packing {len(self._packed)} of "
                                          f"{self._count} parameters")
                # set_reference_from_grads, clear_reference and load_state_dict set it back to True
                opt._reference_was_set = False
            raise
        finally:
            self._mode, self._active = "step", False
            self._packed = set()
            for p in opt._all_params():
                p.grad = None

    # ---- the hooks -----------------------------------------------------------------------------

    def _pre_hook(self, p: Tensor):
        def hook(grad: Tensor) -> None:
            if self._mode != "accumulate" and p.grad is not None:
                self._abort()
                raise RuntimeError(self._accumulation_error(p))
        return hook

    def _accumulation_error(self, p: Tensor) -> str:
        return (f"in_backward: parameter {self.optimizer.param_name(p)} already holds a gradient when "
                "its backward arrives; steps in backward cannot accumulate gradients over several "
                "backwards (each backward steps and frees them). For gradient accumulation call "
                "opt.step() normally (detach()); for a reference over several batches use "
                "reference_pass(accumulate=True).")

    def _begin(self, current: Tensor) -> None:
        """The first hook of a backward: checks everything, writes nothing."""
        opt = self.optimizer
        params = opt._all_params()
        if len(params) != self._count:
            raise RuntimeError(f"in_backward: the optimizer holds {len(params)} parameters but {self._count} "
                               "were attached (add_param_group after attaching?); detach() and attach again")
        if self._mode != "accumulate":
            held = [p for p in params if p is not current and p.grad is not None]
            unhooked = [p for p in held if id(p) not in self._hooked]
            if unhooked:
                raise RuntimeError(f"in_backward: parameter {opt.param_name(unhooked[0])} has a gradient but no "
                                   "hook: it did not require grad when the optimizer was attached. detach() "
                                   "and attach again after changing requires_grad")
            if held:
                raise RuntimeError(self._accumulation_error(held[0]))
        if self._mode == "pack":
            self._pass_backwards += 1
            if self._pass_backwards > 1:
                raise RuntimeError("in_backward.reference_pass: a second backward inside one reference pass; "
                                   "per-backward packing keeps only the sign of one backward's gradient. Use "
                                   "reference_pass(accumulate=True) for a reference over several batches.")
        if self._mode == "step":
            if self._broken_reference is not None:
                if not opt._reference_was_set:
                    raise RuntimeError(f"in_backward: {self._broken_reference}, so parameters hold references "
                                       "from two different passes; run a reference pass again (or "
                                       "set_reference_from_grads / clear_reference) before stepping")
                self._broken_reference = None
            groups = len(opt.param_groups)
            self._frozen, self._stepped, self._nonfinite = [[] for _ in range(groups)], [0] * groups, [[] for _ in range(groups)]
            if isinstance(opt, CPLOptimizer):
                opt._begin_step()
        self._active = True
        try:
            _ENGINE.queue_callback(self._end)
        except RuntimeError:
            pass  # not inside the autograd engine (a hook called by hand): finished at the next begin

    def _on_grad(self, p: Tensor) -> None:
        if self._mode == "accumulate":
            return
        try:
            task = torch._C._current_graph_task_id()
            if self._active and task != -1 and task not in self._tasks:
                if _backward_depth() > self._depth:
                    # A backward run inside this one (a reentrant checkpoint recomputing its
                    # segment): its gradients belong to this step.
                    self._tasks.add(task)
                else:
                    # The previous backward stopped outside these hooks (an error in another hook
                    # or Function), so its final callback never ran: what it stepped is its step.
                    self._end()
            if not self._active:
                self._begin(p)
                self._tasks, self._depth, self._done = {task}, _backward_depth(), set()
            if id(p) in self._done:
                raise RuntimeError(
                    f"in_backward: parameter {self.optimizer.param_name(p)} got a second gradient in the same "
                    "backward, after its first was already "
                    f"{'packed' if self._mode == 'pack' else 'stepped'}: it is used both inside and outside a "
                    "reentrant checkpoint (torch.utils.checkpoint with use_reentrant=True, whose segment "
                    "runs a backward of its own), so its gradient arrives in parts. Use "
                    "use_reentrant=False (what HF gradient_checkpointing_enable does by default), or "
                    "step normally.")
            self._done.add(id(p))
            with torch.no_grad():
                if self._mode == "pack":
                    self._pack(p)
                else:
                    self._step(p)
        except BaseException:
            self._abort()
            raise
        finally:
            if self._mode != "accumulate":
                p.grad = None

    def _abort(self) -> None:
        """A hook raised: the backward stops; free every gradient, drop this backward's counts."""
        self._active = False
        for q in self.optimizer._all_params():
            q.grad = None
        if self._mode == "step" and isinstance(self.optimizer, CPLOptimizer):
            self.optimizer._frozen, self.optimizer._stepped, self.optimizer._nonfinite = [], [], []

    def _finish_pending(self) -> None:
        if self._active:
            self._end()

    def _end(self) -> None:
        """The backward is over (an autograd final callback)."""
        if not self._active:
            return
        self._active = False
        if self._mode != "step":
            return
        opt = self.optimizer
        opt._opt_called = True  # what LRScheduler's step wrapper records: no "scheduler before step" warning
        if isinstance(opt, CPLOptimizer):
            opt._frozen = [[torch.stack(c).sum()] if c else [] for c in self._frozen]
            opt._stepped = list(self._stepped)
            opt._nonfinite = self._nonfinite
            opt._end_step()

    def _pack(self, p: Tensor) -> None:
        opt = self.optimizer
        g = p.grad
        if g.is_sparse:
            raise RuntimeError(f"in_backward.reference_pass: parameter {opt.param_name(p)} got a sparse "
                               "mastered gradient; CPL needs dense gradients")
        lp, lg = local(p), local(g)
        if lg.shape != lp.shape or lg.device != lp.device or not lg.is_floating_point():
            raise ValueError(f"in_backward.reference_pass: the gradient of parameter {opt.param_name(p)} has "
                             f"dtype {lg.dtype}, shape {tuple(lg.shape)} on {lg.device}; the parameter has "
                             f"shape {tuple(lp.shape)} on {lp.device}")
        if lg.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            lg = lg.float()
        state = opt.state[p]
        codes = state.get(CODES_KEY)
        if codes is None:
            codes = state[CODES_KEY] = ops.empty_codes(lp)
        ops.pack_signs_(_layout.flat_in_layout_of(lg.detach(), lp), codes)
        self._packed.add(id(p))

    def _step(self, p: Tensor) -> None:
        """One parameter through the optimizer's own step path (StateOptimizer.step, one item)."""
        opt = self.optimizer
        gi = self._group_of[id(p)]
        group = opt.param_groups[gi]
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(p, self.max_grad_norm)
        item = opt._item(p)
        opt._grad_scale = None
        plan = opt._plan_group(group, [item])
        work = [[] for _ in opt.param_groups]
        work[gi] = [item]
        opt._check_finite(work)
        if isinstance(opt, CPLOptimizer):
            opt._frozen, opt._stepped, opt._nonfinite = [], [], []
            plan()
            self._frozen[gi].extend(opt._frozen[0])
            self._stepped[gi] += opt._stepped[0]
            self._nonfinite[gi].extend(opt._nonfinite[0])
        else:
            plan()
        item.write_back()


def in_backward(optimizer: StateOptimizer, *, max_grad_norm: float | None = None) -> InBackward:
    """Attaches `optimizer` to its parameters' backward: returns the InBackward handle."""
    return InBackward(optimizer, max_grad_norm=max_grad_norm)
