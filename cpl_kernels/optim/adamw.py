"""CPLAdamW: torch.optim.AdamW (decoupled weight decay) with the CPL rule."""
from __future__ import annotations

from .adam import CPLAdam


class CPLAdamW(CPLAdam):
    """AdamW with Collaborative Parameter Learning; see CPLAdam for the rule and the state.

    The update direction includes the decay, u = mhat/(sqrt(vhat)+eps) + weight_decay*p, so a
    frozen element is not decayed either (DESIGN.md table). With no reference it is
    torch.optim.AdamW (default weight_decay=1e-2)."""

    DECOUPLED = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, **kwargs)
