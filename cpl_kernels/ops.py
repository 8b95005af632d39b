"""Typed wrappers for the cpl:: ops: validate, pick the backend, call it.

Every op has one schema (csrc/ops.cpp), one reference (reference.py), and a kernel per backend.
The contract of each op is the docstring of its reference function.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend
from . import _checks as check
from . import reference as ref


def kernel(name: str, device: torch.device):
    """The implementation of op `name` that serves `device` (no validation: callers check)."""
    backend = _backend.choose(device)
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.cpl, name)
    if backend == "triton":
        from . import triton as triton_ops
        return getattr(triton_ops, name)
    return getattr(ref, name)


def empty_codes(like: Tensor) -> Tensor:
    """A zeroed sign-code buffer for a tensor shaped like `like` (0.25 B per element)."""
    return torch.zeros(ref.num_code_words(like.numel()), dtype=torch.int32, device=like.device)


def empty_mask(like: Tensor) -> Tensor:
    """A zeroed 1-bit-per-element mask buffer for a tensor shaped like `like`."""
    return torch.zeros(ref.num_mask_words(like.numel()), dtype=torch.int32, device=like.device)


def pack_signs_(src: Tensor, codes: Tensor | None = None) -> Tensor:
    """Writes the 2-bit sign codes of `src` into `codes` (allocated when None) and returns it."""
    check.tensor("pack_signs_", "src", src, dtypes=check.PARAM_DTYPES)
    if codes is None:
        codes = empty_codes(src)
    check.codes("pack_signs_", "codes", codes, src.numel(), like=src)
    kernel("pack_signs_", src.device)(src, codes)
    return codes


def contribution_stats(a: Tensor, b: Tensor, mask_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(counts [n_pos, n_neg, n_zero] int64, sums [pos_sum, neg_sum] fp64) of the products a*b."""
    check.tensor("contribution_stats", "a", a, dtypes=check.PARAM_DTYPES)
    check.tensor("contribution_stats", "b", b, dtypes=check.PARAM_DTYPES, like=a, numel=a.numel())
    if mask_out is not None:
        check.mask_words("contribution_stats", "mask_out", mask_out, a.numel(), like=a)
    return kernel("contribution_stats", a.device)(a, b, mask_out)


def contribution_stats_codes(a: Tensor, codes: Tensor, mask_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """As contribution_stats, with b given as packed sign codes."""
    check.tensor("contribution_stats_codes", "a", a, dtypes=check.PARAM_DTYPES)
    check.codes("contribution_stats_codes", "codes", codes, a.numel(), like=a)
    if mask_out is not None:
        check.mask_words("contribution_stats_codes", "mask_out", mask_out, a.numel(), like=a)
    return kernel("contribution_stats_codes", a.device)(a, codes, mask_out)


def cpl_adam_step_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, codes: Tensor | None,
    step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    decoupled: bool, criterion: str = "update", strict: bool = True,
) -> Tensor:
    """Fused CPL Adam/AdamW step; returns the conflicting-element count (int64 0-dim tensor)."""
    op = "cpl_adam_step_"
    check.param_and_grad(op, param, grad)
    check.fp32_state(op, "exp_avg", exp_avg, param)
    check.fp32_state(op, "exp_avg_sq", exp_avg_sq, param)
    if codes is not None:
        check.codes(op, "codes", codes, param.numel(), like=param)
    check.criterion(op, criterion, strict)
    check.hyper(op, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    return kernel(op, param.device)(param, grad, exp_avg, exp_avg_sq, codes, float(step), float(lr),
                                   float(beta1), float(beta2), float(eps), float(weight_decay),
                                   bool(decoupled), criterion, bool(strict))


def cpl_sgd_step_(
    param: Tensor, grad: Tensor, momentum_buffer: Tensor | None, codes: Tensor | None,
    lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
    nesterov: bool = False, init_buffer: bool = False, criterion: str = "update", strict: bool = True,
) -> Tensor:
    """Fused CPL SGD(+momentum) step; returns the conflicting-element count."""
    op = "cpl_sgd_step_"
    check.param_and_grad(op, param, grad)
    if momentum != 0:
        if momentum_buffer is None:
            raise ValueError(f"cpl.{op}: argument 'momentum_buffer' is required when momentum={momentum}")
        check.fp32_state(op, "momentum_buffer", momentum_buffer, param)
    if codes is not None:
        check.codes(op, "codes", codes, param.numel(), like=param)
    check.criterion(op, criterion, strict)
    check.hyper(op, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"cpl.{op}: argument 'nesterov' needs momentum > 0 and dampening == 0")
    return kernel(op, param.device)(param, grad, momentum_buffer if momentum != 0 else None, codes,
                                   float(lr), float(momentum), float(dampening), float(weight_decay),
                                   bool(nesterov), bool(init_buffer), criterion, bool(strict))


def masked_adamw_step_(
    param: Tensor, grad: Tensor, mask_words: Tensor, block_offsets: Tensor,
    exp_avg: Tensor, exp_avg_sq: Tensor, step: float, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float,
) -> None:
    """Compact-state AdamW step on the active elements of `mask_words` (see reference.py).

    Shapes and dtypes are checked here. The contents of the compact state (no mask bits past
    param.numel(), block_offsets = reference.mask_block_offsets(mask_words), one exp_avg entry per
    active element: docs/design.md section 3) are checked by every backend itself before it
    writes, with a ValueError naming the first bad block; not here too, which would double the
    check (and, on a GPU, its host sync)."""
    op = "masked_adamw_step_"
    check.param_and_grad(op, param, grad)
    check.mask_words(op, "mask_words", mask_words, param.numel(), like=param)
    check.tensor(op, "block_offsets", block_offsets, dtypes=(torch.int64,), like=param,
                 numel=ref.num_offset_blocks(param.numel()))
    check.tensor(op, "exp_avg", exp_avg, dtypes=(torch.float32,), like=param)
    check.tensor(op, "exp_avg_sq", exp_avg_sq, dtypes=(torch.float32,), like=param, numel=exp_avg.numel())
    if exp_avg.numel() > param.numel():
        raise ValueError(f"cpl.{op}: argument 'exp_avg' has {exp_avg.numel()} entries, more than "
                         f"'param' has elements ({param.numel()})")
    check.hyper(op, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    kernel(op, param.device)(param, grad, mask_words, block_offsets, exp_avg, exp_avg_sq, float(step),
                            float(lr), float(beta1), float(beta2), float(eps), float(weight_decay))


def _register_fakes() -> None:
    """Meta/fake implementations so the ops trace under torch.compile and pass opcheck."""
    if not _backend.native_loaded():
        return

    @torch.library.register_fake("cpl::pack_signs_")
    def _(src, codes):
        return None

    def stats_fake(a, b, mask_out):
        return a.new_empty(3, dtype=torch.int64), a.new_empty(2, dtype=torch.float64)

    torch.library.register_fake("cpl::contribution_stats")(stats_fake)
    torch.library.register_fake("cpl::contribution_stats_codes")(stats_fake)

    @torch.library.register_fake("cpl::cpl_adam_step_")
    def _(param, *args):
        return param.new_empty((), dtype=torch.int64)

    @torch.library.register_fake("cpl::cpl_sgd_step_")
    def _(param, *args):
        return param.new_empty((), dtype=torch.int64)

    @torch.library.register_fake("cpl::masked_adamw_step_")
    def _(*args):
        return None

    if hasattr(torch.ops.cpl, "cpl_step_"):
        @torch.library.register_fake("cpl::cpl_step_")
        def _(params, *args):
            device = params[0].device if params else None
            return torch.empty((2, len(params)), dtype=torch.int64, device=device)

    if hasattr(torch.ops.cpl, "cpl_step_8bit_"):
        @torch.library.register_fake("cpl::cpl_step_8bit_")
        def _(params, *args):
            device = params[0].device if params else None
            return torch.empty((2, len(params)), dtype=torch.int64, device=device)

    # Multi-tensor ops (cpl_kernels/multi_tensor.py): one int64 count per param. Guarded so a
    # stale build without these schemas still imports.
    if hasattr(torch.ops.cpl, "cpl_adam_step_multi_"):
        @torch.library.register_fake("cpl::cpl_adam_step_multi_")
        def _(params, *args):
            return params[0].new_empty((len(params),), dtype=torch.int64)

    if hasattr(torch.ops.cpl, "cpl_sgd_step_multi_"):
        @torch.library.register_fake("cpl::cpl_sgd_step_multi_")
        def _(params, *args):
            return params[0].new_empty((len(params),), dtype=torch.int64)


_register_fakes()
