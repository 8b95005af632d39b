"""Which implementation serves a tensor.

Order (docs/design.md section 2): CUDA tensor -> the CUDA kernel if built, else Triton; CPU tensor ->
the C++ kernel; anything else -> the pure-PyTorch reference. CPL_BACKEND=cpp|cuda|triton|reference
forces one for every call (an error if it cannot serve the tensor). A missing native library is
reported once, loudly, naming what falls back.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

BACKENDS = ("cpp", "cuda", "triton", "reference")
_load_error: str | None = None

try:
    from . import _C  # noqa: F401  (import registers the cpl:: ops)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _load_error = str(exc)
    warnings.warn(
        "cpl_kernels: the native library cpl_kernels._C could not be loaded "
        f"({exc}); every op falls back to the pure-PyTorch reference (slow). "
        "Reinstall with `pip install --no-build-isolation -e .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def native_loaded() -> bool:
    return _load_error is None


@functools.cache
def has_native_kernel(dispatch_key: str) -> bool:
    """True when cpl_kernels._C registered a kernel for `dispatch_key` ("CPU" or "CUDA")."""
    if not native_loaded():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("cpl::pack_signs_", dispatch_key)


@functools.cache
def has_op(op: str, dispatch_key: str) -> bool:
    """True when cpl_kernels._C declares cpl::`op` and registered a kernel for `dispatch_key`."""
    if not native_loaded() or not hasattr(torch.ops.cpl, op):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"cpl::{op}", dispatch_key)


def native_op(op: str, backend: str) -> bool:
    """`backend` is a native one (cpp, cuda) and cpl_kernels._C registered a kernel of `op` for it."""
    return backend in ("cpp", "cuda") and has_op(op, "CPU" if backend == "cpp" else "CUDA")


def warn_fallback(what: str) -> None:
    _warn_fallback(what)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def forced() -> str | None:
    value = os.environ.get("CPL_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"CPL_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def choose(device: torch.device) -> str:
    """The backend that serves tensors on `device`."""
    want = forced()
    if want is not None:
        _check_can_serve(want, device)
        return want
    if device.type == "cuda":
        if has_native_kernel("CUDA"):
            return "cuda"
        if triton_available():
            return "triton"
        _warn_fallback("CUDA tensors (no CUDA kernels built, triton not installed)")
        return "reference"
    if device.type == "cpu":
        if has_native_kernel("CPU"):
            return "cpp"
        return "reference"
    return "reference"


def _check_can_serve(backend: str, device: torch.device) -> None:
    if backend == "cpp" and (device.type != "cpu" or not has_native_kernel("CPU")):
        raise RuntimeError(f"CPL_BACKEND=cpp cannot serve a {device.type} tensor "
                           f"(native CPU kernels loaded: {has_native_kernel('CPU')})")
    if backend == "cuda" and (device.type != "cuda" or not has_native_kernel("CUDA")):
        raise RuntimeError(f"CPL_BACKEND=cuda cannot serve a {device.type} tensor "
                           f"(native CUDA kernels built: {has_native_kernel('CUDA')})")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("CPL_BACKEND=triton but triton is not installed")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("CPL_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")


@functools.cache
def _warn_fallback(what: str) -> None:
    warnings.warn(f"cpl_kernels: falling back to the pure-PyTorch reference for {what}",
                  RuntimeWarning, stacklevel=3)
