"""The benchmark rows, built on identical model-shaped tensors per size (benchmarks/common.py).

Bytes counted per parameter element (the docs/design.md section 5 convention: what one fused pass must
move, not what an implementation happens to move):
  AdamW fp32            28     read p, g, m, v; write p, m, v
  CPL Adam/AdamW fp32   28.25  + 2-bit sign codes (read)
  CPL AdamW bf16 params 22.25  p, g 2 B each (p read + write), m, v fp32, codes
  CPL SGD momentum      20.25  read p, g, buf; write p, buf; codes (torch SGD momentum: 20)
  CPL Lion              20.25  read p, g, m; write p, m; codes
  CPL AdamW 8-bit       16.31  read p, g (4 B each), m, v codes (1 B each), absmax (2 x 4/256), codes;
                               write p, m, v codes, absmax (tensors < 4096 elements: fp32 state, 28.25)
  torchao AdamW8bit     16.06  the same without the sign codes
  MoFOAdamW             28     AdamW's pass (+0.25 with a reference); its threshold's sampled read
                               (16K elements of m and g per tensor above 16K, all of smaller ones)
                               is not counted: it is the overhead the ratio shows
  paper-style eager     32     AdamW's 28 + the fp32 reference read (its real traffic is higher:
                               temporaries; that is the point of the comparison)
  MaskedAdamW           12 * L + 16 * f + 0.133, L = fraction of 64-byte lines of p holding an
                        active element (measured from the mask), f = active fraction; p read and
                        written and g read by whole lines, compact m, v, the mask bits and offsets
  pack_signs_ (fp32)    4.25   read src, write codes
  contribution_stats    8.125  read a, b (fp32), write the 1-bit mask; bf16 a, b: 4.125;
                        codes variant: read a, the 2-bit codes, write the mask, 4 + 0.25 + 0.125 = 4.375
  cpl_mask_words        8.133  as contribution_stats + the block offsets (codes variant: 4.383)
State bytes per parameter come from each optimizer's own state tensors (state_bytes()).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

import cpl_kernels
from cpl_kernels import ops
from cpl_kernels.optim import CPLAdam, CPLAdamW, CPLAdamW8bit, CPLLion, CPLSGD, MaskedAdamW, MoFOAdamW, state_bytes

from .common import Case, clone_params, lines_touched, make_params, reference_grads
from .paper_style import PaperStyleCPLAdamW

MASK_FRACTIONS = (0.1, 0.3, 0.5, 1.0)


@contextmanager
def backend(name: str | None):
    """CPL_BACKEND while a step runs (read per call by cpl_kernels._backend)."""
    old = os.environ.get("CPL_BACKEND")
    if name:
        os.environ["CPL_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CPL_BACKEND", None)
        else:
            os.environ["CPL_BACKEND"] = old


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _stepper(opt, backend_name: str | None = None):
    def run():
        with backend(backend_name):
            opt.step()
    opt.step() if backend_name is None else run()  # allocate state before timing
    return run


def state_bytes_torchao(opt) -> int:
    """torchao keeps 8-bit state in tensor subclasses: count their codes and scales."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if hasattr(v, "codes"):
                total += v.codes.numel() * v.codes.element_size() + v.scale.numel() * v.scale.element_size()
            elif isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def torch_cases(base) -> list[Case]:
    n = _numel(base)
    out = []
    for kind in ("fused", "foreach"):
        opt = torch.optim.AdamW(clone_params(base), lr=1e-3, **{kind: True})
        out.append(Case(f"torch AdamW {kind}=True", "adamw", _stepper(opt), 28.0, state_bytes(opt) / n, n))
    try:
        from torchao.optim import AdamW8bit  # a test dependency (requirements.txt); optional here
    except ImportError:
        AdamW8bit = None
    if AdamW8bit is not None:
        # torchao compiles its per-parameter step with torch.compile (inductor C++ on CPU): the
        # first step compiles one graph per distinct shape, then the timed steps run compiled.
        opt = AdamW8bit(clone_params(base), lr=1e-3)
        out.append(Case("torchao AdamW8bit", "adamw", _stepper(opt), 16.06, state_bytes_torchao(opt) / n, n,
                        note="torch.compile'd, 8-bit state from 4096 elements"))
    for kind in ("fused", "foreach"):  # CPLSGD's target is the faster of these two
        opt = torch.optim.SGD(clone_params(base), lr=1e-3, momentum=0.9, **{kind: True})
        out.append(Case(f"torch SGD momentum {kind}=True", "sgd", _stepper(opt), 20.0, state_bytes(opt) / n, n))
    return out


def cpl_cases(base, refs, with_reference_backend: bool) -> list[Case]:
    """CPL optimizers with a reference set, so the CPL path (codes) runs."""
    n = _numel(base)
    out = []

    def cpl(name, cls, params, nbytes, backend_name="cpp", note="", **kw):
        opt = cls(params, **kw)
        opt.set_reference_from_grads([r.to(p.dtype) for p, r in zip(params, refs)])
        out.append(Case(name, "cpl", _stepper(opt, backend_name), nbytes, opt.state_bytes() / n, n, note=note,
                        rounds=2 if backend_name == "reference" else None))
        return opt

    # Default options throughout (check_finite="skip": the non-finite test is fused into the step).
    cpl("CPLAdamW cpp fp32", CPLAdamW, clone_params(base), 28.25, note="default options, reference set")
    nr = CPLAdamW(clone_params(base))
    nr.clear_reference()
    out.append(Case("CPLAdamW cpp fp32, no reference", "cpl", _stepper(nr), 28.0, nr.state_bytes() / n, n,
                    note="default options: the plain AdamW step through the engine"))
    cpl("CPLAdamW cpp fp32, check_finite='raise'", CPLAdamW, clone_params(base), 28.25, check_finite="raise",
        note="the pre-pass: one more read of every gradient (4 B/param)")
    bf16 = [p.detach().to(torch.bfloat16).requires_grad_() for p in base]
    for p, q in zip(bf16, base):
        p.grad = q.grad.to(torch.bfloat16)
    cpl("CPLAdamW cpp bf16 params", CPLAdamW, bf16, 22.25, note="fp32 state")
    cpl("CPLAdam cpp fp32", CPLAdam, clone_params(base), 28.25)
    cpl("CPLAdamW8bit cpp fp32", CPLAdamW8bit, clone_params(base), 16.31,
        note="8-bit blockwise m, v (fp32 below 4096 elements), reference set")
    nr8 = CPLAdamW8bit(clone_params(base))
    nr8.clear_reference()
    out.append(Case("CPLAdamW8bit cpp fp32, no reference", "cpl", _stepper(nr8), 16.06, nr8.state_bytes() / n, n,
                    note="the 8-bit AdamW step through the engine"))
    cpl("CPLSGD momentum cpp fp32", CPLSGD, clone_params(base), 20.25, lr=1e-3, momentum=0.9)
    cpl("CPLLion cpp fp32", CPLLion, clone_params(base), 20.25, lr=1e-4)
    if with_reference_backend:
        cpl("CPLAdamW reference fp32", CPLAdamW, clone_params(base), 28.25, backend_name="reference",
            check_finite=False, note="pure-PyTorch oracle backend")
    paper = PaperStyleCPLAdamW(clone_params(base))
    paper.set_reference(refs)
    paper.step()
    out.append(Case("paper-style eager CPL AdamW", "cpl", paper.step, 32.0, paper.state_bytes() / n, n,
                    note="fp32 reference copy + full-size temporaries"))
    return out


def mofo_cases(base, refs) -> list[Case]:
    """MoFOAdamW with default options (alpha 0.15, one engine call and one threshold per tensor),
    alone and with a CPL reference (criterion "gradient", the lab's cpl-mofo)."""
    n = _numel(base)
    plain = MoFOAdamW(clone_params(base))
    out = [Case("MoFOAdamW cpp fp32", "mofo", _stepper(plain), 28.0, plain.state_bytes() / n, n,
                note="default options (alpha 0.15), no reference")]
    both = MoFOAdamW(clone_params(base), criterion="gradient")
    both.set_reference_from_grads(refs)
    out.append(Case("MoFOAdamW cpp fp32, reference set", "mofo", _stepper(both), 28.25, both.state_bytes() / n, n,
                    note="criterion 'gradient' (cpl-mofo)"))
    return out


def random_mask(p: torch.Tensor, frac: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(p.shape, generator=gen) < frac


def row_mask(p: torch.Tensor, frac: float, gen: torch.Generator) -> torch.Tensor:
    """Whole rows (output neurons) active; 1-D tensors by element."""
    if p.dim() < 2:
        return random_mask(p, frac, gen)
    rows = torch.rand(p.shape[0], generator=gen) < frac
    return rows[:, None].expand(p.shape).contiguous()


def masked_cases(base, fractions=MASK_FRACTIONS, structured=(0.3,)) -> list[Case]:
    n = _numel(base)
    out = []
    gen = torch.Generator().manual_seed(3)
    plans = [("random", f, random_mask) for f in fractions] + [("rows", f, row_mask) for f in structured]
    for kind, frac, make in plans:
        params = clone_params(base)
        masks = [make(p, frac, gen) for p in params]
        flat = torch.cat([m.reshape(-1) for m in masks])
        lines = sum(lines_touched(m, 16) * m.numel() for m in masks) / n
        nbytes = 12 * lines + 16 * float(flat.float().mean()) + 0.133
        opt = MaskedAdamW(params, masks)  # default options: check_finite="skip", fused into the step
        out.append(Case(f"MaskedAdamW {int(frac * 100)}% active ({kind})", "masked", _stepper(opt), nbytes,
                        opt.state_bytes() / n, n,
                        note=f"default options, {kind} mask, {float(flat.float().mean()):.3f} active"))
    return out


def pack_stats_cases(base, refs) -> list[Case]:
    a = torch.cat([p.grad.reshape(-1) for p in base]).float()
    b = torch.cat([r.reshape(-1) for r in refs]).float()
    n = a.numel()
    codes = ops.pack_signs_(b)
    mask = ops.empty_mask(a)
    a16, b16 = a.bfloat16(), b.bfloat16()
    offsets = torch.empty((n + 1023) // 1024, dtype=torch.int64)
    return [
        Case("pack_signs_ (fp32 -> 2-bit codes)", "ops", lambda: ops.pack_signs_(a, codes), 4.25, None, n),
        Case("contribution_stats(a, b, mask)", "ops", lambda: ops.contribution_stats(a, b, mask), 8.125, None, n,
             note="fp32; target >= 60% of the in-place bandwidth"),
        Case("contribution_stats_codes(a, codes, mask)", "ops",
             lambda: ops.contribution_stats_codes(a, codes, mask), 4.375, None, n, note="fp32 a, 2-bit codes"),
        Case("contribution_stats(a, b, mask) bf16", "ops", lambda: ops.contribution_stats(a16, b16, mask), 4.125,
             None, n, note="bf16 a, b"),
        Case("cpl_mask_words(a, b, mask, offsets)", "ops",
             lambda: ops.cpl_mask_words(a, b, None, mask, offsets), 8.133, None, n),
        Case("cpl_mask_words(a, codes, mask, offsets)", "ops",
             lambda: ops.cpl_mask_words(a, None, codes, mask, offsets), 4.383, None, n),
    ]


def all_cases(total: int, small: bool, groups: tuple[str, ...] | None = None) -> list[Case]:
    """Every row for one size; the reference backend and the mask sweep only at the small size.
    groups: only the rows of these groups ("cpl", "mofo", "masked", "ops"), besides torch's."""
    assert cpl_kernels.native_loaded(), "cpl_kernels._C is not built: pip install --no-build-isolation -e ."
    want = (lambda g: True) if groups is None else (lambda g: g in groups)
    base = make_params(total)
    refs = reference_grads(base)
    cases = torch_cases(base)
    if want("cpl"):
        cases += cpl_cases(base, refs, with_reference_backend=small)
    if want("mofo"):
        cases += mofo_cases(base, refs)
    if want("masked"):
        cases += masked_cases(base) if small else masked_cases(base, fractions=(0.3, 1.0), structured=(0.3,))
    if small and want("ops"):
        cases += pack_stats_cases(base, refs)
    return cases
