import os

import torch

# Triton kernels run on CPU under the interpreter; on a GPU machine they compile for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import cpl_kernels  # noqa: E402,F401
from cpl_kernels import _backend  # noqa: E402


def _triton_kernels_present() -> bool:
    try:
        import cpl_kernels.triton as kernels
    except ImportError:
        return False
    return hasattr(kernels, "masked_adamw_step_")


def available_backends(device: str = "cpu") -> list[str]:
    """Every kernel backend that can serve tensors on `device` here (reference excluded)."""
    out = []
    if device == "cpu":
        if _backend.has_native_kernel("CPU"):
            out.append("cpp")
        if _backend.triton_available() and os.environ.get("TRITON_INTERPRET") == "1":
            if _triton_kernels_present():
                out.append("triton")
    elif device == "cuda":
        if _backend.has_native_kernel("CUDA"):
            out.append("cuda")
        if _backend.triton_available() and _triton_kernels_present():
            out.append("triton")
    return out


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


BACKEND_CASES = [(d, b) for d in devices() for b in available_backends(d)]


@pytest.fixture(params=BACKEND_CASES, ids=[f"{d}-{b}" for d, b in BACKEND_CASES])
def backend(request, monkeypatch):
    """(device, backend) with CPL_BACKEND forced for the test."""
    device, name = request.param
    monkeypatch.setenv("CPL_BACKEND", name)
    return device, name

