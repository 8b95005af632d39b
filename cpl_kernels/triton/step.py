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
# Table rows (int64 each). The 8-bit format: _S1/_S2 hold the uint8 codes, _A1/_A2 the absmax.
_PARAM, _GRAD, _S1, _S2, _CODES, _NUMEL, _FIRST, _A1, _A2 = range(9)
_ROWS = 10
_NO_PROGRAM = 2**62  # first-program entry of an unused table column: never <= a program id

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _as_ptr(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every address of the launch is 16-byte aligned (checked on the host): vector accesses
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load_state8(q_ptr, a_ptr, qmap_ptr, elem, live):
    """A slot's fp32 values from the 8-bit format: qmap[code] * absmax of the element's block."""
    code = tl.load(q_ptr + elem, mask=live, other=0).to(tl.int32)
    scale = tl.load(a_ptr + elem // 256, mask=live, other=0.0)
    return tl.load(qmap_ptr + code) * scale


@triton.jit
def _store_state8(x, q_ptr, a_ptr, thresh_ptr, elem, live, first_block, numel, run, BLOCK_WORDS: tl.constexpr):
    """x ([BLOCK_WORDS, 16], fp32) into the 8-bit format, one 256-element block per row of a
    [BLOCK_WORDS // 16, 256] view (quant8.quantize_; C++: engine.h quantize): absmax = max |x| (NaN
    if the block holds one) clipped at 1e-12, code = the number of thresholds <= x / absmax."""
    rows = tl.reshape(tl.where(live, x, 0.0), (BLOCK_WORDS // 16, 256))
    nan = rows != rows
    amax = tl.max(tl.where(nan, 0.0, tl.abs(rows)), axis=1)
    absmax = tl.where(tl.max(nan.to(tl.int32), axis=1) > 0, float("nan"), tl.maximum(amax, 1e-12))
    y = tl.math.div_rn(rows, absmax[:, None])
    c = tl.zeros((BLOCK_WORDS // 16, 256), dtype=tl.int32)
    for k in tl.static_range(8):  # steps 128, 64, ..., 1: a branchless binary search
        s = 128 >> k
        c += tl.where(y >= tl.load(thresh_ptr + c + (s - 1)), s, 0)
    tl.store(q_ptr + elem, tl.reshape(c, (BLOCK_WORDS, 16)).to(tl.uint8), mask=live)
    blocks = first_block + tl.arange(0, BLOCK_WORDS // 16).to(tl.int64)
    tl.store(a_ptr + blocks, absmax, mask=(blocks * 256 < numel) & run)


@triton.jit
def _rule_tile(p_ptr, g_ptr, s1_ptr, s2_ptr, codes_ptr, scale_ptr, elem, words, lanes, live, code_live,
               a1_ptr, a2_ptr, qmap_ptr, first_block, numel, run, FORMAT8: tl.constexpr,
               BLOCK_WORDS: tl.constexpr, lr, beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction1,
               bias_correction2_sqrt, eps, weight_decay, momentum, one_minus_dampening, threshold,
               HAS_CODES: tl.constexpr, CRITERION_UPDATE: tl.constexpr, STRICT: tl.constexpr,
               SKIP_NONFINITE: tl.constexpr, HAS_SCALE: tl.constexpr, KIND: tl.constexpr,
               HAS_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               INIT_BUFFER: tl.constexpr, HAS_S1: tl.constexpr, HAS_S2: tl.constexpr,
               LOAD_S1: tl.constexpr, LOAD_S2: tl.constexpr):
    """The CPL rule on one [BLOCK_WORDS, 16] tile (reference_step._step_one, step by step), on fp32
    state or (FORMAT8) the 8-bit blockwise format, dequantized on load and requantized on store.
    Loads and stores are masked by `live` only, never by a per-element condition, so that a
    whole-chunk tile (a uniform mask) gets vector accesses; where the rule must leave a value as
    it was, the old value is stored back. Returns (conflicting, non-finite) counts."""
    p = tl.load(p_ptr + elem, mask=live, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + elem, mask=live, other=0.0).to(tl.float32)
    s1 = tl.zeros_like(p)
    s2 = tl.zeros_like(p)
    # A slot is read when its direction reads it, or to store it back over non-finite elements.
    if FORMAT8:  # the slots' pointers are uint8 codes; maps: qmap_ptr[slot * 512 + (0: values, 256: thresholds)]
        if HAS_S1 and (LOAD_S1 or SKIP_NONFINITE):
            s1 = _load_state8(s1_ptr, a1_ptr, qmap_ptr, elem, live)
        if HAS_S2 and (LOAD_S2 or SKIP_NONFINITE):
            s2 = _load_state8(s2_ptr, a2_ptr, qmap_ptr + 512, elem, live)
    else:
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

    if FORMAT8:
        if HAS_S1:
            _store_state8(tl.where(good, n1, s1), s1_ptr, a1_ptr, qmap_ptr + 256, elem, live, first_block, numel,
                          run, BLOCK_WORDS)
        if HAS_S2:
            _store_state8(tl.where(good, n2, s2), s2_ptr, a2_ptr, qmap_ptr + 768, elem, live, first_block, numel,
                          run, BLOCK_WORDS)
    else:
        if HAS_S1:
            tl.store(s1_ptr + elem, tl.where(good, n1, s1), mask=live)
        if HAS_S2:
            tl.store(s2_ptr + elem, tl.where(good, n2, s2), mask=live)
    store_param(p_ptr + elem, tl.where(apply, p - lr * u, p), live)
    conflicting = tl.sum(tl.sum((live & good & (ok == 0)).to(tl.int64), axis=1), axis=0)
    nonfinite = tl.sum(tl.sum((live & bad).to(tl.int64), axis=1), axis=0)
    return conflicting, nonfinite


@triton.jit(do_not_specialize=["program_base", "total_programs"])
def _step_kernel(table_ptr, partial_ptr, found_ptr, scale_ptr, qmap_ptr, program_base, total_programs, lr,
                 beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction1,
                 bias_correction2_sqrt, eps, weight_decay, momentum, one_minus_dampening, threshold,
                 DTYPE: tl.constexpr, TABLE: tl.constexpr, BLOCK_WORDS: tl.constexpr,
                 ALIGNED: tl.constexpr, HAS_CODES: tl.constexpr, CRITERION_UPDATE: tl.constexpr,
                 STRICT: tl.constexpr, SKIP_NONFINITE: tl.constexpr, HAS_SCALE: tl.constexpr,
                 HAS_FOUND_INF: tl.constexpr, KIND: tl.constexpr, HAS_DECAY: tl.constexpr,
                 HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, INIT_BUFFER: tl.constexpr,
                 HAS_S1: tl.constexpr, HAS_S2: tl.constexpr, LOAD_S1: tl.constexpr,
                 LOAD_S2: tl.constexpr, FORMAT8: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    # Table rows are written by number (a jit function sees only constexpr globals): _PARAM = 0,
    # _GRAD = 1, _S1 = 2, _S2 = 3, _CODES = 4, _NUMEL = 5, _FIRST = 6, _A1 = 7, _A2 = 8.
    # This program's tensor: the last column whose first program is <= pid.
    firsts = tl.load(table_ptr + 6 * TABLE + tl.arange(0, TABLE))  # row _FIRST
    col = table_ptr + (tl.sum((firsts <= pid).to(tl.int32), axis=0) - 1)
    numel = tl.load(col + 5 * TABLE)  # row _NUMEL
    chunk = pid - tl.load(col + 6 * TABLE)
    p_ptr = _as_ptr(tl.load(col + 0 * TABLE), DTYPE, ALIGNED)
    g_ptr = _as_ptr(tl.load(col + 1 * TABLE), DTYPE, ALIGNED)
    if FORMAT8:
        s1_ptr = _as_ptr(tl.load(col + 2 * TABLE), tl.uint8, ALIGNED)  # null when the slot is unused
        s2_ptr = _as_ptr(tl.load(col + 3 * TABLE), tl.uint8, ALIGNED)
    else:
        s1_ptr = _as_ptr(tl.load(col + 2 * TABLE), tl.float32, ALIGNED)  # null when the slot is unused
        s2_ptr = _as_ptr(tl.load(col + 3 * TABLE), tl.float32, ALIGNED)
    a1_ptr = tl.load(col + 7 * TABLE).to(tl.pointer_type(tl.float32))  # 8-bit format only
    a2_ptr = tl.load(col + 8 * TABLE).to(tl.pointer_type(tl.float32))
    first_block = chunk * (BLOCK_WORDS // 16)
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
            p_ptr, g_ptr, s1_ptr, s2_ptr, codes_ptr, scale_ptr, elem, words, lanes, live, code_live, a1_ptr,
            a2_ptr, qmap_ptr, first_block, numel, run, FORMAT8, BLOCK_WORDS, lr,
            beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction1, bias_correction2_sqrt, eps,
            weight_decay, momentum, one_minus_dampening, threshold, HAS_CODES, CRITERION_UPDATE, STRICT,
            SKIP_NONFINITE, HAS_SCALE, KIND, HAS_DECAY, HAS_MOMENTUM, NESTEROV, INIT_BUFFER, HAS_S1,
            HAS_S2, LOAD_S1, LOAD_S2)
    else:  # the tensor's last, partial chunk
        live = (elem < numel) & run
        code_live = (words * 16 < numel) & (run & (codes_addr != 0))
        conflicting, nonfinite = _rule_tile(
            p_ptr, g_ptr, s1_ptr, s2_ptr, codes_ptr, scale_ptr, elem, words, lanes, live, code_live, a1_ptr,
            a2_ptr, qmap_ptr, first_block, numel, run, FORMAT8, BLOCK_WORDS, lr,
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
    return _launch(params, grads, state1, state2, [], [], None, codes, kind, step, lr, hyper, criterion, strict,
                   skip_nonfinite, grad_scale, found_inf)


def cpl_step_8bit_(params, grads, state1, absmax1, state2, absmax2, qmaps, codes, kind, step, lr, hyper,
                   criterion, strict, skip_nonfinite, grad_scale, found_inf):
    """cpl::cpl_step_8bit_ on Triton: the same kernel with FORMAT8 (state1/state2 uint8 codes,
    absmax per 256 elements, qmaps fp32 [2, 2, 256]). Arguments as validated by cpl_kernels.engine."""
    return _launch(params, grads, state1, state2, absmax1, absmax2, qmaps.reshape(-1).contiguous(), codes, kind,
                   step, lr, hyper, criterion, strict, skip_nonfinite, grad_scale, found_inf)


def _launch(params, grads, state1, state2, absmax1, absmax2, qmaps, codes, kind, step, lr, hyper, criterion,
            strict, skip_nonfinite, grad_scale, found_inf):
    format8 = qmaps is not None
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
                if format8:
                    table[_A1][col] = absmax1[i].data_ptr() if slots >= 1 else 0
                    table[_A2][col] = absmax2[i].data_ptr() if slots >= 2 else 0
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
            table_dev[li], partial, found, scale, qmaps if format8 else partial, base, total, s.lr, *scalar_args(s),
            DTYPE=_TL_DTYPE[dtype], TABLE=TABLE_TENSORS, BLOCK_WORDS=STEP_BLOCK_WORDS,
            ALIGNED=aligned, HAS_CODES=has_codes, CRITERION_UPDATE=criterion == "update",
            STRICT=bool(strict), SKIP_NONFINITE=bool(skip_nonfinite),
            HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, FORMAT8=format8, **flags,
            **exact_fp(device))
    cum = torch.zeros(2, total + 1, dtype=torch.int64, device=device)
    torch.cumsum(partial, dim=1, out=cum[:, 1:])
    out[:, seg[2]] = cum[:, seg[1]] - cum[:, seg[0]]
    return out
