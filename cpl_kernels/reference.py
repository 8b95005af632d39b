"""Pure-PyTorch implementation of every op: the oracle the kernels are tested against, and the
fallback on devices no kernel serves.

Layouts (shared by every backend; see docs/ops.md):

* sign codes: 2 bits per element, 16 elements per int32 word, element i at bits 2*(i % 16) of
  word i // 16. Code 0 = zero (also NaN), 1 = positive, 2 = negative; unused bits are 0.
* masks: 1 bit per element, 32 elements per int32 word, element i at bit i % 32 of word i // 32.
  A set bit means collaborative (contribution >= 0) or, for MaskedAdamW, active.
* compact state: `block_offsets[b]` = number of active elements before element b * 1024, so the
  compact index of active element i is block_offsets[i // 1024] + (active bits before i in its
  block).

All math is fp32 whatever the param dtype; sums in contribution_stats are fp64.
The functions here take already-validated inputs (cpl_kernels.ops validates).
"""
from __future__ import annotations

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


def cpl_adam_step_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, codes: Tensor | None,
    step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    decoupled: bool, criterion: str, strict: bool,
) -> Tensor:
    """Adam (decoupled=False, L2 weight decay as torch.optim.Adam) or AdamW (decoupled=True).

    Returns the number of conflicting elements (int64 0-dim tensor): those frozen this step, or,
    for criterion="gradient", strict=False, those whose gradient was zeroed.
    """
    p = param.reshape(-1).float()
    g = grad.reshape(-1).float()
    if not decoupled and weight_decay != 0:
        g = g + weight_decay * p
    n = p.numel()
    ok = torch.ones(n, dtype=torch.bool, device=p.device)
    signs = unpack_signs(codes, n) if codes is not None else None
    if signs is not None and criterion == "gradient":
        ok = _collaborative(g, signs)
        g = torch.where(ok, g, torch.zeros_like(g))
    m = exp_avg.view(-1)
    v = exp_avg_sq.view(-1)
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - beta1**step
    bc2_sqrt = (1 - beta2**step) ** 0.5
    u = (m / bc1) / (v.sqrt() / bc2_sqrt + eps)
    if decoupled and weight_decay != 0:
        u = u + weight_decay * p
    if signs is not None and criterion == "update":
        ok = _collaborative(u, signs)
    apply = ok if (criterion == "update" or strict) else torch.ones_like(ok)
    new_p = torch.where(apply, p - lr * u, p)
    param.view(-1).copy_(new_p.to(param.dtype))
    return (~ok).sum().to(torch.int64)


def cpl_sgd_step_(
    param: Tensor, grad: Tensor, momentum_buffer: Tensor | None, codes: Tensor | None,
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
    init_buffer: bool, criterion: str, strict: bool,
) -> Tensor:
    """SGD with optional momentum, as torch.optim.SGD (buffer = first gradient when init_buffer)."""
    p = param.reshape(-1).float()
    g = grad.reshape(-1).float()
    if weight_decay != 0:
        g = g + weight_decay * p
    n = p.numel()
    ok = torch.ones(n, dtype=torch.bool, device=p.device)
    signs = unpack_signs(codes, n) if codes is not None else None
    if signs is not None and criterion == "gradient":
        ok = _collaborative(g, signs)
        g = torch.where(ok, g, torch.zeros_like(g))
    u = g
    if momentum != 0:
        buf = momentum_buffer.view(-1)
        if init_buffer:
            buf.copy_(g)
        else:
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
        u = g + momentum * buf if nesterov else buf
    if signs is not None and criterion == "update":
        ok = _collaborative(u, signs)
    apply = ok if (criterion == "update" or strict) else torch.ones_like(ok)
    new_p = torch.where(apply, p - lr * u, p)
    param.view(-1).copy_(new_p.to(param.dtype))
    return (~ok).sum().to(torch.int64)


def mask_block_offsets(mask_words: Tensor, numel: int) -> Tensor:
    """block_offsets for a packed mask: active elements before each 1024-element block."""
    active = unpack_mask(mask_words, numel).to(torch.int64)
    blocks = num_offset_blocks(numel)
    padded = torch.zeros(blocks * OFFSET_BLOCK, dtype=torch.int64, device=active.device)
    padded[:numel] = active
    per_block = padded.view(blocks, OFFSET_BLOCK).sum(dim=1)
    return torch.cumsum(per_block, 0) - per_block


def masked_adamw_step_(
    param: Tensor, grad: Tensor, mask_words: Tensor, block_offsets: Tensor,
    exp_avg: Tensor, exp_avg_sq: Tensor, step: float, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float,
) -> None:
    """AdamW on active elements only, with m and v stored compactly (one entry per active
    element, in element order). Inactive elements never move (no decay either)."""
    n = param.numel()
    active = unpack_mask(mask_words, n)
    p = param.reshape(-1).float()[active]
    g = grad.reshape(-1).float()[active]
    m, v = exp_avg.view(-1), exp_avg_sq.view(-1)
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - beta1**step
    bc2_sqrt = (1 - beta2**step) ** 0.5
    u = (m / bc1) / (v.sqrt() / bc2_sqrt + eps) + weight_decay * p
    flat = param.view(-1)
    flat[active] = (p - lr * u).to(param.dtype)
