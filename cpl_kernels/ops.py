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


def native_kernel(name: str, device: torch.device):
    """The native (C++ or CUDA) kernel of op `name` serving `device`, or None. A native kernel
    validates every argument it dereferences before writing (dtypes, sizes, devices, the compact
    state of masked_adamw_step_), so a caller that has checked the rest (shapes, hyperparameters)
    may call it without the typed wrapper's Python checks."""
    return getattr(torch.ops.cpl, name) if _backend.native_op(name, _backend.choose(device)) else None


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


def _amp_scalar(op: str, name: str, t, like: Tensor) -> Tensor | None:
    """GradScaler's grad_scale / found_inf: None, or a one-element float tensor on like's device."""
    if t is None:
        return None
    if not isinstance(t, Tensor) or t.numel() != 1 or not t.is_floating_point():
        raise ValueError(f"cpl.{op}: argument '{name}' must be a one-element floating-point tensor")
    if t.device != like.device:
        raise ValueError(f"cpl.{op}: argument '{name}' is on {t.device} but 'param' is on {like.device}")
    return t


def masked_adamw_step_(
    param: Tensor, grad: Tensor, mask_words: Tensor, block_offsets: Tensor,
    exp_avg: Tensor, exp_avg_sq: Tensor, step: float, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, skip_nonfinite: bool = True, grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> Tensor:
    """Compact-state AdamW step on the active elements of `mask_words` (see reference.py);
    returns the active elements left untouched for a NaN/inf gradient (int64 0-dim tensor on
    param's device; always 0 with skip_nonfinite=False).

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
    if not isinstance(skip_nonfinite, bool):
        raise ValueError(f"cpl.{op}: argument 'skip_nonfinite' must be a bool, got {skip_nonfinite!r}")
    grad_scale = _amp_scalar(op, "grad_scale", grad_scale, param)
    found_inf = _amp_scalar(op, "found_inf", found_inf, param)
    return kernel(op, param.device)(param, grad, mask_words, block_offsets, exp_avg, exp_avg_sq, float(step),
                                    float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                                    skip_nonfinite, grad_scale, found_inf)


def cpl_mask_words(a: Tensor, b: Tensor | None = None, codes: Tensor | None = None,
                   mask_out: Tensor | None = None, block_offsets_out: Tensor | None = None) -> Tensor:
    """Writes the CPL mask of `a` against `b` (or b's sign codes `codes`: exactly one) into
    `mask_out` (int32 words, allocated when None) and, when given, its compact-state offsets into
    `block_offsets_out`; returns the number of set bits (int64 0-dim). Contract:
    reference.cpl_mask_words. Nothing the size of `a` is allocated besides the 1-bit output."""
    op = "cpl_mask_words"
    check.tensor(op, "a", a, dtypes=check.PARAM_DTYPES)
    if (b is None) == (codes is None):
        raise ValueError(f"cpl.{op}: pass exactly one of 'b' and 'codes', got {'neither' if b is None else 'both'}")
    if b is not None:
        check.tensor(op, "b", b, dtypes=(a.dtype,), like=a, numel=a.numel())
    else:
        check.codes(op, "codes", codes, a.numel(), like=a)
    if mask_out is None:
        mask_out = empty_mask(a)
    check.mask_words(op, "mask_out", mask_out, a.numel(), like=a)
    if block_offsets_out is not None:
        check.tensor(op, "block_offsets_out", block_offsets_out, dtypes=(torch.int64,), like=a,
                     numel=ref.num_offset_blocks(a.numel()))
    return kernel(op, a.device)(a, b, codes, mask_out, block_offsets_out)


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

    @torch.library.register_fake("cpl::masked_adamw_step_")
    def _(param, *args):
        return param.new_empty((), dtype=torch.int64)

    if hasattr(torch.ops.cpl, "cpl_mask_words"):
        @torch.library.register_fake("cpl::cpl_mask_words")
        def _(a, *args):
            return a.new_empty((), dtype=torch.int64)

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


_register_fakes()
