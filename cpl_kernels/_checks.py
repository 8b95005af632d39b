"""Input validation shared by every backend: one clear error naming the argument and the problem."""
from __future__ import annotations

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
        if not isinstance(v, (int, float)) or v != v:
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
