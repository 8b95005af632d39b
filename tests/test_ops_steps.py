"""Fused CPL steps on every backend against the reference, and the reference against torch.optim."""
import itertools

import pytest
import torch

from cpl_kernels import ops, reference as ref
from tolerances import PARAM_DTYPES, PARAM_TOL, STATE_TOL, bitwise, shapes_for

RULES = [  # (criterion, strict, with_codes)
    ("update", True, False), ("update", True, True), ("gradient", True, True), ("gradient", False, True),
]


def make_inputs(n, dtype, device, seed):
    # randn inputs: no bf16 subnormals (|x| < 1.2e-38), which the Triton interpreter misreads (an
    # interpreter bug, not a kernel's): interpreter tests must keep them out.
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g).to(dtype)
    grad = torch.randn(n, generator=g).to(dtype)
    r = torch.randn(n, generator=g)
    if n > 4:
        r[torch.randint(0, n, (n // 5,), generator=g)] = 0.0  # untouched by the mastered loss
    codes = ref.pack_signs_(r, torch.empty(ref.num_code_words(n), dtype=torch.int32))
    return p.to(device), grad.to(device), codes.to(device), g


def assert_bitwise(actual, expected, msg):
    actual = actual.cpu()
    if not torch.equal(actual, expected):
        differ = actual.float() != expected.float()
        worst = (actual.float() - expected.float()).abs().max().item()
        raise AssertionError(f"{msg}: {int(differ.sum())} of {differ.numel()} elements differ from the "
                             f"reference (max |diff| {worst:.3g}); expected bitwise equality")


def assert_close_to_reference(actual, same_dtype_ref, fp32_ref, dtype, msg, tol=None, exact=False):
    """exact (tolerances.bitwise): equal bit for bit to the reference run in the same dtype.
    Otherwise within the fp32 tolerance table of that run; or, for bf16/fp16 (docs/design.md
    section 4), an error against the fp32 computation at most twice the error of that reference
    run (PyTorch's own rounding error, which a 1-ulp tie difference can compound)."""
    if exact:
        assert actual.dtype == same_dtype_ref.dtype, msg
        assert_bitwise(actual, same_dtype_ref, msg)
        return
    actual, same_dtype_ref, fp32_ref = (t.cpu().float() for t in (actual, same_dtype_ref, fp32_ref))
    tol = tol or PARAM_TOL[torch.float32]
    if dtype == torch.float32 or torch.allclose(actual, same_dtype_ref, **tol):
        torch.testing.assert_close(actual, same_dtype_ref, **tol, msg=msg)
        return
    own_error = (same_dtype_ref - fp32_ref).abs().max().item()
    kernel_error = (actual - fp32_ref).abs().max().item()
    assert kernel_error <= 2 * own_error, f"{msg}: error {kernel_error} vs torch's own {own_error}"


ADAM = [(False, 0.0), (False, 0.1), (True, 0.1)]  # (decoupled, weight_decay)


@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("decoupled,wd", ADAM, ids=["adam", "adam-l2", "adamw"])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r[0]}-{'strict' if r[1] else 'soft'}-{'codes' if r[2] else 'nocodes'}")
def test_adam_step_matches_reference(backend, dtype, decoupled, wd, rule):
    device, name = backend
    exact = bitwise(device, name)
    criterion, strict, with_codes = rule
    for n in shapes_for(name):
        p, grad, codes, gen = make_inputs(n, dtype, device, seed=n)
        codes = codes if with_codes else None
        m = torch.randn(n, generator=gen).mul_(0.1).to(device)
        v = torch.rand(n, generator=gen).mul_(0.1).to(device)
        rp, rm, rv = p.cpu().clone(), m.cpu().clone(), v.cpu().clone()
        fp, fm, fv = p.cpu().float().clone(), m.cpu().clone(), v.cpu().clone()  # the fp32 computation
        ref_codes = None if codes is None else codes.cpu()
        for step in (1, 2, 7):  # several steps: the state must carry over, bias correction varies
            hyper = (step, 0.05, 0.9, 0.999, 1e-3, wd, decoupled, criterion, strict)
            frozen = ops.cpl_adam_step_(p, grad, m, v, codes, *hyper)
            rfrozen = ref.cpl_adam_step_(rp, grad.cpu(), rm, rv, ref_codes, *hyper)
            if not exact:  # the fp32 computation is only the bf16/fp16 tolerance's yardstick
                ref.cpl_adam_step_(fp, grad.cpu().float(), fm, fv, ref_codes, *hyper)
            msg = f"n={n} step={step}"
            assert frozen.dtype == torch.int64 and frozen.dim() == 0
            assert int(frozen) == int(rfrozen), msg
            assert_close_to_reference(p, rp, fp, dtype, msg, exact=exact)
            assert_close_to_reference(m, rm, fm, dtype, msg, STATE_TOL, exact=exact)
            assert_close_to_reference(v, rv, fv, dtype, msg, STATE_TOL, exact=exact)


SGD = [(0.0, False, 0.0, 0.0), (0.0, False, 0.0, 0.01), (0.9, False, 0.0, 0.0), (0.9, False, 0.1, 0.01),
       (0.9, True, 0.0, 0.01)]  # (momentum, nesterov, dampening, weight_decay)


@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("momentum,nesterov,dampening,wd", SGD,
                         ids=["plain", "plain-wd", "momentum", "momentum-dampening-wd", "nesterov-wd"])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r[0]}-{'strict' if r[1] else 'soft'}-{'codes' if r[2] else 'nocodes'}")
def test_sgd_step_matches_reference(backend, dtype, momentum, nesterov, dampening, wd, rule):
    device, name = backend
    exact = bitwise(device, name)
    criterion, strict, with_codes = rule
    for n in shapes_for(name):
        p, grad, codes, gen = make_inputs(n, dtype, device, seed=n + 11)
        codes = codes if with_codes else None
        buf = torch.zeros(n, device=device) if momentum else None
        rp, rbuf = p.cpu().clone(), None if buf is None else buf.cpu().clone()
        fp, fbuf = p.cpu().float().clone(), None if buf is None else buf.cpu().clone()
        ref_codes = None if codes is None else codes.cpu()
        for step in (1, 2, 3):
            hyper = (0.05, momentum, dampening, wd, nesterov, step == 1, criterion, strict)
            frozen = ops.cpl_sgd_step_(p, grad, buf, codes, *hyper)
            rfrozen = ref.cpl_sgd_step_(rp, grad.cpu(), rbuf, ref_codes, *hyper)
            if not exact:
                ref.cpl_sgd_step_(fp, grad.cpu().float(), fbuf, ref_codes, *hyper)
            msg = f"n={n} step={step}"
            assert int(frozen) == int(rfrozen), msg
            assert_close_to_reference(p, rp, fp, dtype, msg, exact=exact)
            if buf is not None:
                assert_close_to_reference(buf, rbuf, fbuf, dtype, msg, STATE_TOL, exact=exact)


# ---- the reference rule itself -------------------------------------------------------------

def run_side_by_side(torch_opt_cls, torch_kwargs, step_fn, steps=50, n=257):
    gen = torch.Generator().manual_seed(0)
    p_torch = torch.nn.Parameter(torch.randn(n, generator=gen))
    p_ours = p_torch.detach().clone()
    opt = torch_opt_cls([p_torch], **torch_kwargs)
    state = {}
    for t in range(1, steps + 1):
        grad = torch.randn(n, generator=gen)
        p_torch.grad = grad.clone()
        opt.step()
        step_fn(p_ours, grad, state, t)
        torch.testing.assert_close(p_ours, p_torch.detach(), rtol=1e-5, atol=1e-6, msg=f"step {t}")


@pytest.mark.parametrize("via_ops", [False, True], ids=["reference", "dispatched"])
@pytest.mark.parametrize("decoupled,wd", [(True, 0.01), (True, 0.0), (False, 0.0), (False, 0.05)])
def test_adam_without_codes_equals_torch_optim(via_ops, decoupled, wd):
    fn = ops.cpl_adam_step_ if via_ops else ref.cpl_adam_step_
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    kwargs = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)

    def step(p, g, state, t):
        if not state:
            state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
        fn(p, g, state["m"], state["v"], None, t, 1e-2, 0.9, 0.999, 1e-8, wd, decoupled, "update", True)

    run_side_by_side(cls, kwargs, step)


@pytest.mark.parametrize("via_ops", [False, True], ids=["reference", "dispatched"])
@pytest.mark.parametrize("momentum,dampening,nesterov,wd", [(0, 0, False, 0), (0.9, 0, False, 0.01),
                                                            (0.9, 0.2, False, 0), (0.8, 0, True, 0.01)])
def test_sgd_without_codes_equals_torch_optim(via_ops, momentum, dampening, nesterov, wd):
    fn = ops.cpl_sgd_step_ if via_ops else ref.cpl_sgd_step_
    kwargs = dict(lr=1e-2, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd)

    def step(p, g, state, t):
        buf = state.setdefault("buf", torch.zeros_like(p))
        fn(p, g, buf, None, 1e-2, momentum, dampening, wd, nesterov, t == 1, "update", True)

    run_side_by_side(torch.optim.SGD, kwargs, step)


def test_update_criterion_freezes_exactly_the_conflicting_elements():
    """Written from the table of docs/design.md section 1, independently of reference.py's code."""
    gen = torch.Generator().manual_seed(3)
    n = 4096
    p, grad, r = (torch.randn(n, generator=gen) for _ in range(3))
    r[:100] = 0.0
    codes = ref.pack_signs_(r, ops.empty_codes(r))
    m, v = torch.zeros(n), torch.zeros(n)
    before = p.clone()
    frozen = ops.cpl_adam_step_(p, grad, m, v, codes, 1, 0.1, 0.9, 0.999, 1e-8, 0.0, True, "update", True)
    u = (0.1 * grad / 0.1) / ((0.001 * grad * grad / 0.001).sqrt() + 1e-8)  # mhat/(sqrt(vhat)+eps)
    conflicting = (u * r) < 0
    assert int(frozen) == int(conflicting.sum()) > n // 4
    assert torch.equal(p[conflicting], before[conflicting])
    torch.testing.assert_close(p[~conflicting], before[~conflicting] - 0.1 * u[~conflicting])


def test_gradient_criterion_keeps_conflicting_gradient_out_of_state():
    gen = torch.Generator().manual_seed(4)
    n = 1000
    p, grad, r = (torch.randn(n, generator=gen) for _ in range(3))
    codes = ref.pack_signs_(r, ops.empty_codes(r))
    for strict in (True, False):
        q, m, v = p.clone(), torch.zeros(n), torch.zeros(n)
        ops.cpl_adam_step_(q, grad, m, v, codes, 1, 0.1, 0.9, 0.999, 1e-8, 0.0, True, "gradient", strict)
        conflicting = grad * r < 0
        assert torch.equal(m[conflicting], torch.zeros(int(conflicting.sum())))
        assert torch.equal(v[conflicting], torch.zeros(int(conflicting.sum())))
        torch.testing.assert_close(m[~conflicting], 0.1 * grad[~conflicting])
        # zero state -> u = 0 on conflicting elements, so strict and soft agree at step 1
        assert torch.equal(q[conflicting], p[conflicting])
