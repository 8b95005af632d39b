"""Input validation shared by every backend: one clear error naming the argument and the problem."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference as ref

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CRITERIA = ("update", "gradient")


def _fail(op: str, name: str, problem: str) -> None:
    raise ValueError(f"cpl.{op}: argument '{name}' {problem}")


def tensor(op: str, name: str, t, *, dtypes=None, numel=None, like: Tensor | None = None) -> None:
    if not isinstance(t, Tensor):
        _fail(op, name, f"must be a torch.Tensor, got {type(t).__name__}")
    if t.is_sparse or t.layout != torch.strided:
        _fail(op, name, f"must be a dense (strided) tensor, got layout {t.layout}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        _fail(op, name, f"has dtype {str(t.dtype).replace('torch.', '')}; expected one of: {allowed}")
    if not t.is_contiguous():
        _fail(op, name, f"must be contiguous (shape {tuple(t.shape)}, stride {t.stride()}); call .contiguous()")
    if like is not None and t.device != like.device:
        _fail(op, name, f"is on {t.device} but the other inputs are on {like.device}")
    if numel is not None and t.numel() != numel:
        _fail(op, name, f"has {t.numel()} elements; expected {numel}")


def on_device(op: str, name: str, t, device: torch.device) -> None:
    """t is a dense tensor on `device`: what routes a call to a kernel (a sparse or meta entry
    would send it to another one); the native kernels check the rest."""
    if not isinstance(t, Tensor):
        _fail(op, name, f"must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        _fail(op, name, f"must be a dense (strided) tensor, got layout {t.layout}")
    if t.device != device:
        _fail(op, name, f"is on {t.device} but the other inputs are on {device}")


def all_on_device(op: str, name: str, xs, device: torch.device, none_ok: bool = False) -> None:
    """on_device for every entry of the list `name` (None entries allowed when none_ok): one pass
    without a call per entry (the per-entry form cost ~1.2 us an entry, 0.17 ms a 35-tensor step),
    the entry named only when one fails."""
    strided = torch.strided
    if all((t is None and none_ok) or (isinstance(t, Tensor) and t.device == device and t.layout == strided)
           for t in xs):
        return
    for i, t in enumerate(xs):
        if not (t is None and none_ok):
            on_device(op, f"{name}[{i}]", t, device)


def same_shape(op: str, name: str, t: Tensor, ref_name: str, ref_t: Tensor) -> None:
    if t.shape != ref_t.shape:
        _fail(op, name, f"has shape {tuple(t.shape)} but '{ref_name}' has shape {tuple(ref_t.shape)}")


def codes(op: str, name: str, c: Tensor, numel: int, like: Tensor) -> None:
    words = ref.num_code_words(numel)
    if isinstance(c, Tensor) and c.numel() != words:
        _fail(op, name, f"holds {c.numel()} int32 words but {numel} elements need {words} "
                        f"(2-bit codes, 16 per word); was it built for another tensor?")
    tensor(op, name, c, dtypes=(torch.int32,), like=like)


def mask_words(op: str, name: str, m: Tensor, numel: int, like: Tensor) -> None:
    words = ref.num_mask_words(numel)
    if isinstance(m, Tensor) and m.numel() != words:
        _fail(op, name, f"holds {m.numel()} int32 words but {numel} elements need {words} (1 bit each, 32 per word)")
    tensor(op, name, m, dtypes=(torch.int32,), like=like)


def criterion(op: str, value: str, strict: bool = True) -> None:
    if value not in CRITERIA:
        _fail(op, "criterion", f"must be one of {CRITERIA}, got {value!r}")


def hyper(op: str, **values: float) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            _fail(op, name, f"must be a finite number, got {v!r}")
    if "lr" in values and values["lr"] < 0:
        _fail(op, "lr", f"must be >= 0, got {values['lr']}")
    for b in ("beta1", "beta2"):
        if b in values and not 0.0 <= values[b] < 1.0:
            _fail(op, b, f"must be in [0, 1), got {values[b]}")
    if "eps" in values and values["eps"] < 0:
        _fail(op, "eps", f"must be >= 0, got {values['eps']}")
    if "step" in values and values["step"] < 1:
        _fail(op, "step", f"counts from 1, got {values['step']}")
    if "weight_decay" in values and values["weight_decay"] < 0:
        _fail(op, "weight_decay", f"must be >= 0, got {values['weight_decay']}")
    if "momentum" in values and values["momentum"] < 0:
        _fail(op, "momentum", f"must be >= 0, got {values['momentum']}")


def param_and_grad(op: str, param: Tensor, grad: Tensor) -> None:
    tensor(op, "param", param, dtypes=PARAM_DTYPES)
    tensor(op, "grad", grad, dtypes=PARAM_DTYPES, like=param)
    if grad.dtype != param.dtype:
        _fail(op, "grad", f"has dtype {grad.dtype} but 'param' has {param.dtype}; they must match")
    same_shape(op, "grad", grad, "param", param)


def fp32_state(op: str, name: str, t: Tensor, param: Tensor, numel: int | None = None) -> None:
    tensor(op, name, t, dtypes=(torch.float32,), like=param, numel=param.numel() if numel is None else numel)


def compact_state(op: str, mask_words: Tensor, block_offsets: Tensor, numel: int, state_len: int) -> None:
    """The compact-state invariant of docs/design.md section 3, checked before anything is
    written (the Python backends' copy of the C++ pre-pass in csrc/cpu/masked_adamw.cpp, with
    the same messages): no mask bits past `numel`, block_offsets[0] == 0, block_offsets[b+1] ==
    block_offsets[b] + popcount(block b), and the last offset plus its block's popcount ==
    state_len (the length of exp_avg). Then every compact index lies in [0, state_len).

    Shapes and dtypes are the caller's to check. Vectorised (SWAR popcount of the words, per-block
    sums) on the tensors' device, with one host sync when the state is valid; the detailed
    message is built only on failure."""
    blocks = ref.num_offset_blocks(numel)
    if blocks == 0:
        if state_len != 0:
            _fail(op, "exp_avg", f"has {state_len} entries but an empty 'param' has no active elements")
        return
    per_block = ref.mask_block_counts(mask_words, numel)
    off = block_offsets.reshape(-1)
    tail_bits = numel % ref.BITS_PER_WORD
    bits_ok = torch.ones((), dtype=torch.bool, device=off.device)
    if tail_bits:
        last_word = mask_words.reshape(-1)[-1:].to(torch.int64) & 0xFFFFFFFF
        bits_ok = (last_word >> tail_bits).eq(0).all()
    in_range = (off >= 0) & (off <= state_len)
    links = torch.empty(blocks, dtype=torch.bool, device=off.device)
    links[:1] = off[:1] == 0
    links[1:] = off[1:] == off[:-1] + per_block[:-1]
    total_ok = off[-1] + per_block[-1] == state_len
    if bool(bits_ok & (in_range & links).all() & total_ok):  # the one host sync
        return
    _compact_state_error(op, mask_words, off.cpu(), per_block.cpu(), numel, state_len, bool(bits_ok))


def _compact_state_error(op: str, mask_words: Tensor, off: Tensor, per_block: Tensor, numel: int,
                         state_len: int, bits_ok: bool) -> None:
    """Raises for the first violation, in the order (and wording) of the C++ check."""
    if not bits_ok:
        _fail(op, "mask_words", f"has bits set past the last of the {numel} elements")
    o, c = off.tolist(), per_block.tolist()
    for b, x in enumerate(o):
        if x < 0:
            _fail(op, "block_offsets", f"has a negative entry: block_offsets[{b}] = {x}")
        if x > state_len:
            _fail(op, "block_offsets", f"entry block_offsets[{b}] = {x} exceeds the {state_len} "
                                       "entries of 'exp_avg'")
        if b == 0 and x != 0:
            _fail(op, "block_offsets", f"must start at 0, got block_offsets[0] = {x}")
        if b > 0 and x < o[b - 1]:
            _fail(op, "block_offsets", f"decreases at block {b}: block_offsets[{b}] = {x} < "
                                       f"block_offsets[{b - 1}] = {o[b - 1]}")
        if b > 0 and x != o[b - 1] + c[b - 1]:
            _fail(op, "block_offsets", f"does not match 'mask_words' at block {b}: block_offsets[{b}] "
                                       f"= {x}, but block_offsets[{b - 1}] = {o[b - 1]} plus the "
                                       f"{c[b - 1]} active elements of block {b - 1} make {o[b - 1] + c[b - 1]}")
    last = len(o) - 1
    _fail(op, "exp_avg", f"has {state_len} entries but the mask has {o[last] + c[last]} active elements "
                         f"(block_offsets[{last}] = {o[last]} plus the {c[last]} of block {last}); "
                         "the compact state needs exactly one entry per active element")
