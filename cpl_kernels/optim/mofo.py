"""MoFOAdamW: the Momentum-Filtered Optimizer (Chen et al., "MoFO: Momentum-Filtered Optimizer for
Mitigating Forgetting in LLM Fine-Tuning", TMLR 2025, arXiv 2407.20999) through the step engine
(kind "mofo", cpl_kernels/kinds.py), with the CPL rule composable around it."""
from __future__ import annotations

import math
from collections.abc import Iterable

from torch import Tensor

from . import _momentum_filter
from .adamw import CPLAdamW

DEFAULT_ALPHA = 0.15


def check_alpha(owner: str, alpha, where: str = "alpha") -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or not 0.0 < alpha <= 1.0:
        raise ValueError(f"{owner}: {where} must be a number in (0, 1] (the fraction of each tensor "
                         f"updated per step), got {alpha!r}")


class MoFOAdamW(CPLAdamW):
    """MoFO on AdamW: each step, per parameter tensor, m and v are updated for every element as in
    AdamW, and the update is applied only to the elements whose new momentum |m_t| is among the
    top-`alpha` fraction of that tensor; every other element keeps its value.

    Source. The paper's text (Algorithm 1, its update rule) could not be read from this project's
    sources (no network); the rule here is the one the authors' code implements
    (github.com/YChen-zzz/MoFO, open_instruct/algorithms_MoFO.py, AdamW_MoFO): moments for all
    elements, then `threshold = topk(|m|, int(n*fraction)).min()` and the Adam step applied where
    `|m| >= threshold`. alpha's default, 0.15, is the value the authors' README and scripts use
    (`--MoFO_fraction 0.15`; the README recommends 5% to 20%).

    Choices, and where they differ from the authors' code:
    - Block = each parameter tensor (the authors' partition: one block per named parameter).
      Embeddings are filtered as one tensor (rows of tokens absent from the batch have small |m|
      and are rarely picked). The authors exempt biases and norms from the filter (full AdamW
      updates there); here every tensor is filtered unless its param group sets `alpha=1.0`,
      which is how to reproduce theirs (cpl_lab's `mofo` method does).
    - Weight decay is decoupled (AdamW's `u += weight_decay * p`) and applied only where the
      update is: "all other elements keep their value", decay included. The authors' code decays
      every element (`p *= 1 - lr*wd` before the filter); their scripts run with wd = 0, where the
      two agree. Default weight_decay 1e-2 (torch.optim.AdamW's), so alpha=1.0 is exactly
      CPLAdamW / torch.optim.AdamW.
    - Ties: every element with |m_t| >= the threshold is updated, so a step updates at least
      k = max(1, floor(alpha*n)) elements of a tensor of n, more only on exact ties (e.g. many
      zero momenta when fewer than k elements ever had a gradient: threshold 0, all pass).
    - The threshold is exact for tensors of up to 16,384 elements and a sampled estimate above
      (a fixed sample of 1,024 whole 64-byte lines, 16,384 elements: one extra read of 64 KiB of
      m and of g per tensor); the fraction kept then differs from alpha by a quantile's sampling
      error, sqrt(alpha*(1-alpha)/N) for N between 1,024 and 16,384 effective draws (0.0028 to
      0.011 at alpha = 0.15; optim/_momentum_filter.py, bound tested in tests/test_mofo.py).
      The kept fraction of the last step is `kept_fraction`.

    With CPL (a reference set, `criterion`/`strict` as in CPLAdamW): the momentum filter picks the
    top-alpha of the tensor's new momentum, then the CPL rule freezes the conflicting elements
    among them, so an element moves iff it passes both (criterion "gradient": m_t is built from
    the collaborative gradient only, and the threshold is taken over that m_t). `frozen_counts`
    stay CPL's conflicting counts.

    Cost: one engine call per tensor (the threshold is a per-tensor hyperparameter) plus the
    threshold's read; on a GPU one host read of each threshold (a sync per tensor).
    State, checkpoints, GradScaler and non-finite gradients as CPLAdamW ('step', 'exp_avg',
    'exp_avg_sq'; the group key 'alpha' is saved and restored)."""

    KEEP_GROUP_KEYS = CPLAdamW.KEEP_GROUP_KEYS + ("alpha",)

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, alpha: float = DEFAULT_ALPHA, amsgrad: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None, criterion: str = "update",
                 strict: bool = True, check_finite: bool | str = "skip") -> None:
        owner = type(self).__name__
        check_alpha(owner, alpha)
        self._kept: list[tuple[float, int]] = []
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, foreach=foreach, maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused, criterion=criterion,
                         strict=strict, check_finite=check_finite)
        self.defaults["alpha"] = alpha
        for group in self.param_groups:  # a group's own alpha was checked by add_param_group
            group.setdefault("alpha", alpha)
        # Plain MoFO (no reference) is this optimizer's ordinary use: no "no reference" warning.
        self._warned_no_reference = True

    def add_param_group(self, param_group) -> None:
        if "alpha" in param_group:
            check_alpha(type(self).__name__, param_group["alpha"], "the param group's 'alpha'")
        super().add_param_group(param_group)
        if "alpha" in self.defaults:
            self.param_groups[-1].setdefault("alpha", self.defaults["alpha"])

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_kept", [])

    def _kind(self, group) -> str:
        return "mofo"

    def _check_group(self, owner: str, group, lr: float) -> None:
        super()._check_group(owner, group, lr)
        check_alpha(owner, group.get("alpha"), "the param group's 'alpha'")

    def _engine_calls(self, group, fresh: bool, bucket: list, grad_scale):
        """One engine call per tensor. Every threshold of the bucket is computed first, from m and
        g only, before any call writes (optim/_momentum_filter.thresholds)."""
        hyper = self._hyper(group, fresh)
        found = _momentum_filter.thresholds([(slots[0], item.work_grad, codes) for item, slots, codes in bucket],
                                            group["alpha"], group["betas"][0], group["criterion"], grad_scale)
        for entry, (t, kept) in zip(bucket, found):
            self._kept.append((kept, entry[0].work_grad.numel()))
            yield [entry], hyper + [t]

    def _begin_step(self) -> None:
        super()._begin_step()
        self._kept = []

    @property
    def kept_fraction(self) -> float:
        """Fraction of the elements stepped last step whose momentum passed the filter (exact
        for tensors of up to 16,384 elements, estimated from the sample above; CPL's freezing
        not subtracted). 0.0 before any step."""
        total = sum(n for _, n in self._kept)
        return sum(k for k, _ in self._kept) / total if total else 0.0

    def _plain_name(self) -> str:
        return "MoFO"
