"""The step engine on Triton: `cpl_step_` (the contract: cpl_kernels/reference_step.py).

One kernel, `_step_kernel`, holds the CPL rule once; the optimizer kind is a tl.constexpr that
selects its direction (cpl_kernels/triton/directions.py), so each kind compiles to its own
specialised kernel with no run-time branching on the kind.

Launches: one per dtype group and per TABLE_TENSORS tensors (not one per tensor). The host packs
a table of raw addresses and sizes (int64 [8, TABLE_TENSORS] per launch: param, grad, state1,
state2, codes, numel, first program, unused), copies all tables to the device in one transfer,
and each program finds its tensor by comparing its id with the first-program column (one
vector load and a sum, no search loop), then its chunk of BLOCK_WORDS * 16 elements. All
offsets are int64. A whole chunk runs with uniform masks, so an aligned launch (every address
16-byte aligned, checked on the host and passed as tl.multiple_of hints) gets 16-byte vector
loads and stores; a tensor's last, partial chunk runs with per-element masks. Stores are never
masked per element: what the rule leaves alone (frozen params, the state of non-finite
elements) is stored back unchanged.

Scalars: derived in one place, reference_step.scalars (fp32-rounded Python floats, passed by
value), so the bias corrections are the reference's bit for bit. That reads `step` and `lr` on the
host (one device sync per call on a GPU; the call is then not CUDA-graph capturable: the CUDA op
is, it reads them on the device). grad_scale and found_inf stay on the device: they are passed
as pointers (a torch cast to fp32, and `found_inf != 0` as int32, both without a sync), and a
nonzero found_inf masks off every load and store, so nothing is written and the counts are 0.

Counts: each program stores its conflicting and non-finite counts in a partial buffer
[2, programs]; one cumsum and a gather at the segment ends give the per-tensor counts (exact
int64 arithmetic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import kinds as K
from .. import reference_step
from ._common import STEP_BLOCK_WORDS, collaborative, decode_signs, exact_fp, store_param
from .directions import constexprs, direction, pre, scalar_args

# Tensors per launch: each program loads the whole first-program column (TABLE_TENSORS int64,
# 1 KiB, cache-resident) to find its tensor; 128 covers most models' dtype groups in 1-3 launches.
TABLE_TENSORS = 128
# Table rows (int64 each).
_PARAM, _GRAD, _S1, _S2, _CODES, _NUMEL, _FIRST = range(7)
_ROWS = 8
_NO_PROGRAM = 2**62  # first-program entry of an unused table column: never <= a program id

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _as_ptr(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every address of the launch is 16-byte aligned (checked on the host): vector accesses
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _rule_tile(p_ptr, g_ptr, s1_ptr, s2_ptr, codes_ptr, scale_ptr, elem, words, lanes, live, code_live,
               lr, beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction1,
               bias_correction2_sqrt, eps, weight_decay, momentum, one_minus_dampening, threshold,
               HAS_CODES: tl.constexpr, CRITERION_UPDATE: tl.constexpr, STRICT: tl.constexpr,
               SKIP_NONFINITE: tl.constexpr, HAS_SCALE: tl.constexpr, KIND: tl.constexpr,
               HAS_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               INIT_BUFFER: tl.constexpr, HAS_S1: tl.constexpr, HAS_S2: tl.constexpr,
               LOAD_S1: tl.constexpr, LOAD_S2: tl.constexpr):
    """The CPL rule on one [BLOCK_WORDS, 16] tile (reference_step._step_one, step by step).
    Loads and stores are masked by `live` only, never by a per-element condition, so that a
    whole-chunk tile (a uniform mask) gets vector accesses; where the rule must leave a value as
    it was, the old value is stored back. Returns (conflicting, non-finite) counts."""
    p = tl.load(p_ptr + elem, mask=live, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + elem, mask=live, other=0.0).to(tl.float32)
    s1 = tl.zeros_like(p)
    s2 = tl.zeros_like(p)
    # A slot is read when its direction reads it, or to store it back over non-finite elements.
    if HAS_S1 and (LOAD_S1 or SKIP_NONFINITE):
        s1 = tl.load(s1_ptr + elem, mask=live, other=0.0)
    if HAS_S2 and (LOAD_S2 or SKIP_NONFINITE):
        s2 = tl.load(s2_ptr + elem, mask=live, other=0.0)
    if HAS_CODES:
        r = decode_signs(tl.load(codes_ptr + words, mask=code_live, other=0)[:, None], lanes[None, :])
    else:
        r = tl.zeros_like(p)

    if HAS_SCALE:  # 1. GradScaler's unscale, fused
        g = tl.math.div_rn(g, tl.load(scale_ptr))
    if SKIP_NONFINITE:  # 2. NaN/inf gradient (exponent all ones): untouched and counted
        bad = (g.to(tl.uint32, bitcast=True) & 0x7F800000) == 0x7F800000
        g = tl.where(bad, 0.0, g)
    else:
        bad = live & False
    g = pre(g, p, weight_decay, KIND, HAS_DECAY)  # 3. L2 decay
    ok = live | True
    if not CRITERION_UPDATE:  # 4. criterion "gradient": conflicting gradient is zeroed
        ok = collaborative(g, r)
        g = tl.where(ok, g, 0.0)
    u, n1, n2 = direction(g, p, s1, s2, beta1, beta2, one_minus_beta1, one_minus_beta2,  # 5.
                          bias_correction1, bias_correction2_sqrt, eps, weight_decay, momentum,
                          one_minus_dampening, threshold, KIND, HAS_DECAY, HAS_MOMENTUM, NESTEROV, INIT_BUFFER)
    if CRITERION_UPDATE:  # 6. criterion "update"
        ok = collaborative(u, r)
    good = bad == 0
    if CRITERION_UPDATE or STRICT:  # 7. apply where collaborative (strict=False: everywhere)
        apply = ok & good
    else:
        apply = good

    if HAS_S1:
        tl.store(s1_ptr + elem, tl.where(good, n1, s1), mask=live)
    if HAS_S2:
        tl.store(s2_ptr + elem, tl.where(good, n2, s2), mask=live)
    store_param(p_ptr + elem, tl.where(apply, p - lr * u, p), live)
    conflicting = tl.sum(tl.sum((live & good & (ok == 0)).to(tl.int64), axis=1), axis=0)
    nonfinite = tl.sum(tl.sum((live & bad).to(tl.int64), axis=1), axis=0)
    return conflicting, nonfinite


@triton.jit(do_not_specialize=["program_base", "total_programs"])
def _step_kernel(table_ptr, partial_ptr, found_ptr, scale_ptr, program_base, total_programs, lr,
                 beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction1,
                 bias_correction2_sqrt, eps, weight_decay, momentum, one_minus_dampening, threshold,
                 DTYPE: tl.constexpr, TABLE: tl.constexpr, BLOCK_WORDS: tl.constexpr,
                 ALIGNED: tl.constexpr, HAS_CODES: tl.constexpr, CRITERION_UPDATE: tl.constexpr,
                 STRICT: tl.constexpr, SKIP_NONFINITE: tl.constexpr, HAS_SCALE: tl.constexpr,
                 HAS_FOUND_INF: tl.constexpr, KIND: tl.constexpr, HAS_DECAY: tl.constexpr,
                 HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, INIT_BUFFER: tl.constexpr,
                 HAS_S1: tl.constexpr, HAS_S2: tl.constexpr, LOAD_S1: tl.constexpr,
                 LOAD_S2: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    # Table rows are written by number (a jit function sees only constexpr globals): _PARAM = 0,
    # _GRAD = 1, _S1 = 2, _S2 = 3, _CODES = 4, _NUMEL = 5, _FIRST = 6.
    # This program's tensor: the last column whose first program is <= pid.
    firsts = tl.load(table_ptr + 6 * TABLE + tl.arange(0, TABLE))  # row _FIRST
    col = table_ptr + (tl.sum((firsts <= pid).to(tl.int32), axis=0) - 1)
    numel = tl.load(col + 5 * TABLE)  # row _NUMEL
    chunk = pid - tl.load(col + 6 * TABLE)
    p_ptr = _as_ptr(tl.load(col + 0 * TABLE), DTYPE, ALIGNED)
    g_ptr = _as_ptr(tl.load(col + 1 * TABLE), DTYPE, ALIGNED)
    s1_ptr = _as_ptr(tl.load(col + 2 * TABLE), tl.float32, ALIGNED)  # null when the slot is unused
    s2_ptr = _as_ptr(tl.load(col + 3 * TABLE), tl.float32, ALIGNED)
    codes_addr = tl.load(col + 4 * TABLE)  # 0: this tensor has no reference
    codes_ptr = _as_ptr(codes_addr, tl.int32, ALIGNED)

    words = chunk * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS).to(tl.int64)
    lanes = tl.arange(0, 16)
    elem = words[:, None] * 16 + lanes[None, :]
    run = pid >= 0  # always true (no found_inf)
    if HAS_FOUND_INF:  # GradScaler found an inf: the whole step is skipped, nothing read or written
        run = tl.load(found_ptr) == 0
    if (chunk + 1) * (BLOCK_WORDS * 16) <= numel:
        # A whole chunk: uniform masks (vector accesses; numel comes from memory, so the compiler
        # cannot see that elem < numel holds in whole vectors).
        live = tl.full([BLOCK_WORDS, 16], 1, tl.int1) & run
        code_live = tl.full([BLOCK_WORDS], 1, tl.int1) & (run & (codes_addr != 0))
        conflicting, nonfinite = _rule_tile(
            p_ptr, g_ptr, s1_ptr, s2_ptr, codes_ptr, scale_ptr, elem, words, lanes, live, code_live, lr,
            beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction1, bias_correction2_sqrt, eps,
            weight_decay, momentum, one_minus_dampening, threshold, HAS_CODES, CRITERION_UPDATE, STRICT,
            SKIP_NONFINITE, HAS_SCALE, KIND, HAS_DECAY, HAS_MOMENTUM, NESTEROV, INIT_BUFFER, HAS_S1,
            HAS_S2, LOAD_S1, LOAD_S2)
    else:  # the tensor's last, partial chunk
        live = (elem < numel) & run
        code_live = (words * 16 < numel) & (run & (codes_addr != 0))
        conflicting, nonfinite = _rule_tile(
            p_ptr, g_ptr, s1_ptr, s2_ptr, codes_ptr, scale_ptr, elem, words, lanes, live, code_live, lr,
            beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction1, bias_correction2_sqrt, eps,
            weight_decay, momentum, one_minus_dampening, threshold, HAS_CODES, CRITERION_UPDATE, STRICT,
            SKIP_NONFINITE, HAS_SCALE, KIND, HAS_DECAY, HAS_MOMENTUM, NESTEROV, INIT_BUFFER, HAS_S1,
            HAS_S2, LOAD_S1, LOAD_S2)
    tl.store(partial_ptr + program_base + pid, conflicting)
    tl.store(partial_ptr + total_programs + program_base + pid, nonfinite)


def _aligned(addrs) -> bool:
    return all(a % 16 == 0 for a in addrs)


def cpl_step_(params, grads, state1, state2, codes, kind, step, lr, hyper, criterion, strict,
              skip_nonfinite, grad_scale, found_inf):
    """cpl::cpl_step_ on Triton. Arguments as validated by cpl_kernels.engine (step, lr: 0-dim
    tensors on the params' device; state lists empty for unused slots; codes a list)."""
    n = len(params)
    if n == 0:
        return torch.zeros(2, 0, dtype=torch.int64)
    device = params[0].device
    k = K.KINDS[kind]
    slots = K.state_slots(k, hyper)
    # The one place scalars are derived (fp32-rounded); reads step and lr on the host.
    s = reference_step.scalars(k, float(step), float(lr), dict(zip(k.hyper, hyper)))
    flags = constexprs(kind, s, slots)
    codes = list(codes) if codes is not None else [None] * n
    per_program = STEP_BLOCK_WORDS * 16

    # Pack the tables: dtype groups (one compiled kernel each), TABLE_TENSORS tensors a launch.
    groups: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        if p.numel():
            groups.setdefault(p.dtype, []).append(i)
    launches = []  # (dtype, programs, program_base, aligned, has_codes)
    tables, seg_first, seg_end, seg_slot = [], [], [], []
    total = 0
    for dtype, idx in groups.items():
        for c in range(0, len(idx), TABLE_TENSORS):
            table = [[0] * TABLE_TENSORS for _ in range(_ROWS)]
            table[_FIRST] = [_NO_PROGRAM] * TABLE_TENSORS
            programs = 0
            for col, i in enumerate(idx[c:c + TABLE_TENSORS]):
                addrs = (params[i].data_ptr(), grads[i].data_ptr(),
                         state1[i].data_ptr() if slots >= 1 else 0,
                         state2[i].data_ptr() if slots >= 2 else 0,
                         codes[i].data_ptr() if codes[i] is not None else 0)
                for row, a in enumerate(addrs):
                    table[row][col] = a
                numel = params[i].numel()
                table[_NUMEL][col] = numel
                table[_FIRST][col] = programs
                blocks = triton.cdiv(numel, per_program)
                seg_first.append(total + programs)
                seg_end.append(total + programs + blocks)
                seg_slot.append(i)
                programs += blocks
            used = idx[c:c + TABLE_TENSORS]
            aligned = _aligned(a for row in table[:_NUMEL] for a in row)
            launches.append((dtype, programs, total, aligned, any(codes[i] is not None for i in used)))
            tables.append(table)
            total += programs
    out = torch.zeros(2, n, dtype=torch.int64, device=device)
    if total == 0:  # only empty tensors
        return out
    # One host-to-device copy for every table and the segment index.
    m = len(seg_slot)
    flat = torch.tensor([x for t in tables for row in t for x in row] + seg_first + seg_end + seg_slot,
                        dtype=torch.int64).to(device)
    table_dev = flat[:len(tables) * _ROWS * TABLE_TENSORS].view(len(tables), _ROWS * TABLE_TENSORS)
    seg = flat[len(tables) * _ROWS * TABLE_TENSORS:].view(3, m)

    partial = torch.empty(2, total, dtype=torch.int64, device=device)
    found = (found_inf.reshape(1) != 0).to(torch.int32) if found_inf is not None else partial
    scale = grad_scale.reshape(1).to(torch.float32) if grad_scale is not None else partial
    for li, (dtype, programs, base, aligned, has_codes) in enumerate(launches):
        _step_kernel[(programs,)](
            table_dev[li], partial, found, scale, base, total, s.lr, *scalar_args(s),
            DTYPE=_TL_DTYPE[dtype], TABLE=TABLE_TENSORS, BLOCK_WORDS=STEP_BLOCK_WORDS,
            ALIGNED=aligned, HAS_CODES=has_codes, CRITERION_UPDATE=criterion == "update",
            STRICT=bool(strict), SKIP_NONFINITE=bool(skip_nonfinite),
            HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, **flags,
            **exact_fp(device))
    cum = torch.zeros(2, total + 1, dtype=torch.int64, device=device)
    torch.cumsum(partial, dim=1, out=cum[:, 1:])
    out[:, seg[2]] = cum[:, seg[1]] - cum[:, seg[0]]
    return out
