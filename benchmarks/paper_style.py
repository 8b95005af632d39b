"""The CPL AdamW rule written as the paper's PyTorch code does it: the baseline the fused kernels
are measured against.

What makes it slow and large, on purpose (that is what is being measured):
  * the mastered reference gradient is kept as a full fp32 copy per parameter (4 B/param);
  * every step runs per-tensor eager ops: the moments, then u, the product u*r and the mask, each
    a full-size temporary (several passes over memory per tensor instead of one).
The maths is docs/design.md section 1 ("update" criterion): the state sees the raw gradient and u is
applied where u*r >= 0. With no reference it is AdamW.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


class PaperStyleCPLAdamW:
    """Eager CPL AdamW: m, v fp32 per param plus an fp32 reference gradient per param."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        self.params = [p for p in params]
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.state: dict[Tensor, dict[str, Tensor]] = {}
        self.reference: dict[Tensor, Tensor] = {}
        self.t = 0

    @torch.no_grad()
    def set_reference(self, grads=None) -> None:
        """Keeps a full fp32 copy of each parameter's reference gradient (.grad when None)."""
        for i, p in enumerate(self.params):
            g = p.grad if grads is None else grads[i]
            if g is not None:
                self.reference[p] = g.detach().float().clone()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        bc1 = 1 - b1**self.t
        bc2_sqrt = math.sqrt(1 - b2**self.t)
        for p in self.params:
            if p.grad is None:
                continue
            g = p.grad.float()
            st = self.state.get(p)
            if st is None:
                st = self.state[p] = {"exp_avg": torch.zeros_like(p, dtype=torch.float32),
                                      "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = v.sqrt() / bc2_sqrt + self.eps              # temporary
            u = (m / bc1) / denom                               # temporaries
            u = u + self.weight_decay * p.float()               # temporary
            r = self.reference.get(p)
            if r is not None:
                contribution = u * r                            # full-size product
                mask = contribution >= 0                        # full-size mask
                u = u * mask                                    # frozen elements: no update
            p.sub_((self.lr * u).to(p.dtype))

    def state_bytes(self) -> int:
        tensors = [t for st in self.state.values() for t in st.values()] + list(self.reference.values())
        return sum(t.numel() * t.element_size() for t in tensors)
