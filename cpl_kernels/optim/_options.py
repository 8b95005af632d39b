"""The options every cpl_kernels optimizer shares, validated with torch.optim's words: torch.optim
arguments refused or ignored, the learning rate, betas, eps, weight decay and momentum, and the
check_finite modes. Raised before anything is kept or written."""
from __future__ import annotations

from torch import Tensor

# torch.optim arguments: those that change the maths are refused when switched on; foreach and
# fused only pick an implementation (every step here is already one fused pass per tensor), so
# any value is accepted and ignored.
_REFUSED = ("amsgrad", "maximize", "capturable", "differentiable")
_IGNORED = ("foreach", "fused")


def check_args(owner: str, **flags) -> None:
    for name, value in flags.items():
        if name in _REFUSED and value:
            raise ValueError(f"{owner}: {name}={value!r} is not supported (only {name}=False)")
        if name not in _REFUSED and name not in _IGNORED:
            raise TypeError(f"{owner}: unexpected argument {name!r}")


def lr_value(owner: str, lr) -> float:
    """The learning rate as a float; a Tensor lr must hold one value (torch's rule and words)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{owner}: Tensor lr must be 1-element")
        return float(lr.item())
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"{owner}: lr must be a float or a 1-element Tensor, got {type(lr).__name__}")
    return float(lr)


# check_finite values: "skip" (fused into the step: non-finite elements left untouched, counted,
# warned by name), "raise" (True: a pre-pass; nothing written, FloatingPointError), False (off).
def finite_mode(owner: str, value) -> str | bool:
    """check_finite normalised: True (the old spelling of the pre-pass) is "raise"."""
    if value is True:
        return "raise"
    if value is False or value in ("skip", "raise"):
        return value
    raise ValueError(f"{owner}: check_finite must be 'skip', 'raise' (or True) or False, got {value!r}")


def check_hyper(owner: str, lr, eps=None, betas=None, weight_decay=0.0, momentum=None) -> None:
    value = lr_value(owner, lr)
    if not value >= 0.0:
        raise ValueError(f"{owner}: invalid learning rate lr={lr}")
    if eps is not None and not eps >= 0.0:
        raise ValueError(f"{owner}: invalid eps={eps}")
    if betas is not None:
        if len(betas) != 2:
            raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            if isinstance(b, Tensor):
                # The kernels take betas as host floats; a Tensor beta would only fail later, at
                # the first step (torch itself accepts Tensor betas only for capturable/fused).
                raise ValueError(f"{owner}: betas[{i}] is a Tensor; pass betas as floats")
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{owner}: invalid beta parameter at index {i}: {b}")
    if not weight_decay >= 0.0:
        raise ValueError(f"{owner}: invalid weight_decay={weight_decay}")
    if momentum is not None and not momentum >= 0.0:
        raise ValueError(f"{owner}: invalid momentum={momentum}")
