"""Pure-PyTorch implementation of every op: the oracle the kernels are tested against, and the
fallback on devices no kernel serves.

Layouts (shared by every backend; docs/design.md section 3):

* sign codes: 2 bits per element, 16 elements per int32 word, element i at bits 2*(i % 16) of
  word i // 16. Code 0 = zero (also NaN), 1 = positive, 2 = negative; unused bits are 0.
* masks: 1 bit per element, 32 elements per int32 word, element i at bit i % 32 of word i // 32.
  A set bit means collaborative (contribution >= 0) or, for MaskedAdamW, active.
* compact state: `block_offsets[b]` = number of active elements before element b * 1024, so the
  compact index of active element i is block_offsets[i // 1024] + (active bits before i in its
  block).

All math is fp32 whatever the param dtype; sums in contribution_stats are fp64.
The functions here take already-validated shapes and dtypes (cpl_kernels.ops validates); the
masked step still checks its compact state itself, as every backend does (docs/design.md
section 3).

Rounding of the optimizer steps (the contract the kernels match bit for bit; which backends
the tests hold to it: tests/tolerances.py):

* Scalars are rounded once to fp32 exactly as csrc/cpu/directions.h (adam_scalars) does:
  lr, betas, eps, weight_decay and momentum directly; 1 - beta1, 1 - beta2, 1 - dampening and the
  bias corrections 1 - beta1**t and sqrt(1 - beta2**t) computed in double first (C pow and sqrt).
* Every tensor operation is one IEEE fp32 operation, correctly rounded to nearest even, in the
  operation order of the C++ kernels (csrc/cpu/directions.h for the step engine, whose contract
  is reference_step.py; the compact-state step runs the same AdamW lane): no fused
  multiply-add, no reciprocal for a division.
  Each is computed in float64 and rounded to fp32 (_mul, _add, _sub, _div, _sqrt below). That
  is exact: a float64 result rounded to fp32 equals the correctly rounded fp32 result for +, -,
  *, / and sqrt of fp32 operands, since 53 >= 2*24 + 2 (double rounding is innocuous).
  torch's eager fp32 ops are not this contract: `add_(x, alpha=a)` and `addcmul_` fuse a
  multiply-add on CPU, fp32 `sqrt` is not always correctly rounded, and a division by a scalar
  may become a multiply by its reciprocal. Written with them, this oracle differed from the C++
  kernel by an ulp on 1,181 of 4,096 exp_avg, 91 exp_avg_sq and 52 params after one AdamW step
  (random input, lr 0.05, wd 0.1), and frozen counts differed on near-ties.
* bf16/fp16 params are widened exactly, the step is the fp32 computation above, and the result
  is rounded to the param dtype once (round to nearest even, as tensor.to(dtype)).
* On a device without float64 (MPS) the steps run on CPU copies and copy their results back.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

CODE_ZERO, CODE_POS, CODE_NEG = 0, 1, 2
CODES_PER_WORD = 16
BITS_PER_WORD = 32
OFFSET_BLOCK = 1024  # elements per block_offsets entry: 8 B / 1024 elements = 0.008 B/param

def num_code_words(numel: int) -> int:
    return (numel + CODES_PER_WORD - 1) // CODES_PER_WORD


def num_mask_words(numel: int) -> int:
    return (numel + BITS_PER_WORD - 1) // BITS_PER_WORD


def num_offset_blocks(numel: int) -> int:
    return (numel + OFFSET_BLOCK - 1) // OFFSET_BLOCK


def _pack_fields(values: Tensor, bits: int) -> Tensor:
    """Packs small non-negative ints (one per element) into int32 words, `bits` bits each."""
    per_word = 32 // bits
    n = values.numel()
    words = (n + per_word - 1) // per_word
    padded = torch.zeros(words * per_word, dtype=torch.int64, device=values.device)
    padded[:n] = values.reshape(-1).to(torch.int64)
    shifts = torch.arange(per_word, device=values.device, dtype=torch.int64) * bits
    packed = (padded.view(words, per_word) << shifts).sum(dim=1)
    # Reinterpret the low 32 bits as a signed int32 (bit 31 may be set).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def _unpack_fields(words: Tensor, numel: int, bits: int) -> Tensor:
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    fields = (w.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(-1)[:numel]


def sign_codes(src: Tensor) -> Tensor:
    """Per-element code (0 zero/NaN, 1 positive, 2 negative) as int64, unpacked."""
    x = src.reshape(-1).float()
    return torch.where(x > 0, CODE_POS, torch.where(x < 0, CODE_NEG, CODE_ZERO)).to(torch.int64)


def unpack_signs(codes: Tensor, numel: int) -> Tensor:
    """Inverse of pack_signs_: the sign of each element as fp32 (+1, -1, 0)."""
    c = _unpack_fields(codes, numel, 2)
    return (c == CODE_POS).float() - (c == CODE_NEG).float()


def pack_mask(mask: Tensor) -> Tensor:
    return _pack_fields(mask.reshape(-1).to(torch.int64), 1)


def unpack_mask(words: Tensor, numel: int) -> Tensor:
    return _unpack_fields(words, numel, 1).bool()


def pack_signs_(src: Tensor, codes: Tensor) -> Tensor:
    codes.copy_(_pack_fields(sign_codes(src), 2))
    return codes


def _stats(prod: Tensor, mask_out: Tensor | None) -> tuple[Tensor, Tensor]:
    pos, neg = prod > 0, prod < 0
    counts = torch.stack([pos.sum(), neg.sum(), (~(pos | neg)).sum()]).to(torch.int64)
    sums = torch.stack([prod[pos].sum(), prod[neg].sum()]).to(torch.float64)
    if mask_out is not None:
        mask_out.copy_(pack_mask(~neg))
    return counts, sums


def contribution_stats(a: Tensor, b: Tensor, mask_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """counts = [n_pos, n_neg, n_zero] (int64), sums = [pos_sum, neg_sum] (fp64) of a*b.

    The products are formed in fp64 (exact for fp32 inputs), so pos_sum + neg_sum = dot(a, b).
    A NaN product counts as zero. mask_out (optional) receives the collaborative mask a*b >= 0.
    """
    prod = a.reshape(-1).double() * b.reshape(-1).double()
    prod = torch.where(prod.isnan(), 0.0, prod)
    return _stats(prod, mask_out)


def contribution_stats_codes(a: Tensor, codes: Tensor, mask_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """As contribution_stats with b given as packed sign codes (b_j in {+1, -1, 0})."""
    prod = a.reshape(-1).double() * unpack_signs(codes, a.numel()).double()
    prod = torch.where(prod.isnan(), 0.0, prod)
    return _stats(prod, mask_out)


def _collaborative(x: Tensor, signs: Tensor) -> Tensor:
    """x * r >= 0 decided on signs (ties and NaN count as collaborative)."""
    return ~(((x > 0) & (signs < 0)) | ((x < 0) & (signs > 0)))


# ---- fp32 arithmetic, one correctly rounded operation at a time (see the module docstring) ----

def f32(x: float) -> float:
    """x rounded to the nearest fp32 (as C's static_cast<float>(double)), as a Python float."""
    return torch.tensor(float(x), dtype=torch.float64).to(torch.float32).item()


def _wide(x):
    return x.to(torch.float64) if isinstance(x, Tensor) else x


def _mul(a, b) -> Tensor:
    return (_wide(a) * _wide(b)).to(torch.float32)


def _add(a, b) -> Tensor:
    return (_wide(a) + _wide(b)).to(torch.float32)


def _sub(a, b) -> Tensor:
    return (_wide(a) - _wide(b)).to(torch.float32)


def _div(a: Tensor, b) -> Tensor:
    a = _wide(a)
    # A tensor divisor, never a Python scalar: torch may divide by a scalar as a multiply by its
    # reciprocal, which is not the correctly rounded quotient.
    b = _wide(b) if isinstance(b, Tensor) else torch.full_like(a, b)
    return (a / b).to(torch.float32)


def _sqrt(a: Tensor) -> Tensor:
    return _wide(a).sqrt().to(torch.float32)


def _fp64_on_cpu(*mutated: str):
    """Devices without float64 (MPS) run the step on CPU copies; the tensors named in `mutated`
    are copied back. Every other device computes in place."""
    def wrap(fn):
        import inspect
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            device = bound.arguments["param"].device
            if device.type != "mps":
                return fn(*args, **kwargs)
            host = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in bound.arguments.items()}
            out = fn(**host)
            for k in mutated:
                if isinstance(bound.arguments[k], Tensor):
                    bound.arguments[k].copy_(host[k])
            return out.to(device) if isinstance(out, Tensor) else out
        return run
    return wrap


# ---- compact state ---------------------------------------------------------------------------

def mask_word_popcounts(mask_words: Tensor) -> Tensor:
    """Set bits of each int32 mask word (int64), by SWAR bit tricks on int64 lanes: vectorised
    on any device, no unpacking to one value per element."""
    w = mask_words.to(torch.int64) & 0xFFFFFFFF
    w = w - ((w >> 1) & 0x55555555)
    w = (w & 0x33333333) + ((w >> 2) & 0x33333333)
    w = (w + (w >> 4)) & 0x0F0F0F0F
    return ((w * 0x01010101) >> 24) & 0xFF  # w <= 0x0F0F0F0F, so the product stays below 2**56


def mask_block_counts(mask_words: Tensor, numel: int) -> Tensor:
    """Active elements in each 1024-element block (int64, one per block_offsets entry)."""
    words_per_block = OFFSET_BLOCK // BITS_PER_WORD
    blocks = num_offset_blocks(numel)
    counts = torch.zeros(blocks * words_per_block, dtype=torch.int64, device=mask_words.device)
    counts[: mask_words.numel()] = mask_word_popcounts(mask_words.reshape(-1))
    return counts.view(blocks, words_per_block).sum(dim=1)


def mask_block_offsets(mask_words: Tensor, numel: int) -> Tensor:
    """block_offsets for a packed mask: active elements before each 1024-element block."""
    per_block = mask_block_counts(mask_words, numel)
    return torch.cumsum(per_block, 0) - per_block


@_fp64_on_cpu("param", "exp_avg", "exp_avg_sq")
def masked_adamw_step_(
    param: Tensor, grad: Tensor, mask_words: Tensor, block_offsets: Tensor,
    exp_avg: Tensor, exp_avg_sq: Tensor, step: float, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, skip_nonfinite: bool = False, grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> Tensor:
    """AdamW on active elements only, with m and v stored compactly (one entry per active
    element, in element order). Inactive elements never move (no decay either) and their
    gradient is never read.

    The step of each active element is the step engine's, kind "adamw" without a reference
    (reference_step._step_one, the rule written once): g = grad / grad_scale when grad_scale is
    given; with skip_nonfinite an active element whose g is NaN or inf is left untouched (p, m
    and v) and counted; a nonzero found_inf skips the whole step (nothing written, count 0).
    Returns the number of active elements left untouched for a non-finite gradient (int64 0-dim).

    Raises ValueError, before writing anything, unless mask_words, block_offsets and the length
    of exp_avg satisfy the compact-state invariant (docs/design.md section 3; every backend
    checks it: cpl_kernels._checks.compact_state). fp32 rounding as the module docstring
    states."""
    from . import _checks  # _checks imports this module
    from . import kinds, reference_step

    n = param.numel()
    _checks.compact_state("masked_adamw_step_", mask_words, block_offsets, n, exp_avg.numel())
    if found_inf is not None and float(found_inf.item()) != 0:
        return torch.zeros((), dtype=torch.int64, device=param.device)
    s = reference_step.scalars(kinds.KINDS["adamw"], step, lr,
                               dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay))
    scale = None if grad_scale is None else f32(float(grad_scale.item()))
    active = unpack_mask(mask_words, n)
    p = param.reshape(-1)[active]  # compact copies, in the param dtype
    g = grad.reshape(-1)[active]
    _, nonfinite = reference_step._step_one(p, g, exp_avg.view(-1), exp_avg_sq.view(-1), None,
                                            reference_step.DIRECTIONS["adamw"], s, "update", True,
                                            bool(skip_nonfinite), scale)
    param.view(-1)[active] = p
    return nonfinite.to(torch.int64)


def cpl_mask_words(a: Tensor, b: Tensor | None, codes: Tensor | None, mask_out: Tensor,
                   block_offsets_out: Tensor | None = None) -> Tensor:
    """The CPL mask of one parameter as bits (docs/design.md section 3): bit i of mask_out is 1
    (collaborative: trained by MaskedAdamW) unless a_i * r_i < 0 decided on signs, where r is `b`
    or, when b is None, the packed sign codes `codes` (exactly one of them is given). Ties are
    collaborative: a zero on either side, NaN, and a zero code. Bits past a.numel() are 0.

    block_offsets_out (optional, int64, one per 1024 elements) receives the mask's compact-state
    offsets, mask_block_offsets(mask_out, a.numel()), so MaskedAdamW takes the mask as it is.
    Returns the number of set bits (int64 0-dim): the mask's active elements."""
    n = a.numel()
    r = b.reshape(-1).float() if b is not None else unpack_signs(codes, n)
    bits = _collaborative(a.reshape(-1).float(), r)
    words = pack_mask(bits)
    mask_out.copy_(words)
    if block_offsets_out is not None:
        block_offsets_out.copy_(mask_block_offsets(words, n))
    return bits.sum().to(torch.int64)
