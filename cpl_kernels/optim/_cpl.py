"""CPLOptimizer: the reference (2-bit sign codes per parameter) and the conflicting-element counts
shared by CPLAdam, CPLAdamW and CPLSGD."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .. import ops
from .. import reference as ref
from ._base import StateOptimizer, local

CODES_KEY = "cpl_codes"
CRITERIA = ("update", "gradient")


def check_criterion(owner: str, criterion: str, strict: bool) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"{owner}: criterion must be one of {CRITERIA}, got {criterion!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"{owner}: strict must be a bool, got {strict!r}")


class CPLOptimizer(StateOptimizer):
    """Holds the mastered reference as 2-bit sign codes (state key CODES_KEY, int32, ceil(n/16)
    words per parameter: 0.25 B/element) and the conflicting counts of the last step.

    A parameter without codes has no reference: every element is collaborative (as codes of
    zeros would say) and the step is the plain optimizer's."""

    RAW_STATE = (CODES_KEY,)
    KEEP_GROUP_KEYS = ("criterion", "strict", "check_finite")

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self._frozen: list[list[Tensor]] = []   # per group: 0-dim int64 counts, read lazily
        self._stepped: list[int] = []           # per group: elements stepped last step

    # ---- the reference -------------------------------------------------------------------------

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _source(self, grads, p: Tensor, index: int):
        if grads is None:
            return p.grad
        if isinstance(grads, Mapping):
            if p in grads:  # Tensor keys hash by identity
                return grads[p]
            names = self._names()
            return grads.get(names.get(index)) if names.get(index) is not None else None
        if isinstance(grads, Sequence):
            return grads[index]
        raise TypeError("grads must be None (use .grad), a mapping param/name -> tensor, or a "
                        f"sequence aligned with the optimizer's parameters; got {type(grads).__name__}")

    def _names(self) -> dict[int, str]:
        out, i = {}, 0
        for group in self.param_groups:
            names = group.get("param_names")
            for j in range(len(group["params"])):
                if names:
                    out[i] = names[j]
                i += 1
        return out

    @torch.no_grad()
    def set_reference_from_grads(self, grads=None) -> None:
        """Packs the sign of each parameter's reference gradient into its codes.

        grads: None to read each parameter's current .grad (after a backward pass over the mastered
        set, see cpl_kernels.build_reference), or a mapping (param or name -> tensor) or a sequence
        aligned with the parameters. A parameter whose reference gradient is None gets no
        reference: all its elements are collaborative."""
        params = self._all_params()
        if isinstance(grads, Sequence) and not isinstance(grads, Mapping) and len(grads) != len(params):
            raise ValueError(f"{type(self).__name__}.set_reference_from_grads: got {len(grads)} "
                             f"gradients for {len(params)} parameters")
        for i, p in enumerate(params):
            g = self._source(grads, p, i)
            state = self.state[p]
            if g is None:
                state.pop(CODES_KEY, None)
                if not state:
                    del self.state[p]
                continue
            if g.is_sparse:
                raise RuntimeError(f"{type(self).__name__}.set_reference_from_grads: parameter "
                                   f"{self.param_name(p)} has a sparse reference gradient")
            lp, lg = local(p), local(g)
            if lg.numel() != lp.numel():
                raise ValueError(
                    f"{type(self).__name__}.set_reference_from_grads: the reference gradient for "
                    f"parameter {self.param_name(p)} has {lg.numel()} elements but the parameter has "
                    f"{lp.numel()}; was it computed on a different model?")
            codes = state.get(CODES_KEY)
            if codes is None:  # allocated once, rewritten in place at every refresh
                codes = state[CODES_KEY] = ops.empty_codes(lp)
            ops.pack_signs_(lg.detach().contiguous(), codes)

    def clear_reference(self) -> None:
        """Drops every parameter's codes: the optimizer becomes its torch.optim counterpart."""
        for p in self._all_params():
            state = self.state.get(p)
            if state is not None and CODES_KEY in state:
                del state[CODES_KEY]
                if not state:
                    del self.state[p]

    @property
    def has_reference(self) -> bool:
        return any(CODES_KEY in st for st in self.state.values())

    def _validate_raw(self, p: Tensor, key: str, value: Tensor) -> Tensor:
        want = ref.num_code_words(local(p).numel())
        if value.dtype != torch.int32 or value.numel() != want:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the sign codes for parameter "
                f"{self.param_name(p)} hold {value.numel()} {value.dtype} words but its "
                f"{local(p).numel()} elements need {want} int32 words; was the checkpoint saved from "
                "a different model?")
        return value.reshape(-1).contiguous()

    # ---- the step --------------------------------------------------------------------------------

    def _step_group(self, group, items) -> None:
        raise NotImplementedError

    def step(self, closure=None):
        self._frozen, self._stepped = [], []
        return super().step(closure)

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
