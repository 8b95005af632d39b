"""Multi-tensor CPL steps against the single-tensor reference in a loop, on every backend.

One call mixes dtypes, sizes (including empty tensors) and tensors with and without codes, so
the grouping by dtype and the per-tensor count slots are exercised; state carries over steps.
"""
import pytest
import torch

from cpl_kernels import multi_tensor as mt, reference as ref
from tolerances import PARAM_TOL, STATE_TOL

# The reference loop runs in each tensor's own dtype (fp32 math, one rounding), so a kernel that
# rounds the same fp32 value may differ by at most one ulp of a bf16/fp16 param.
LOW_PRECISION_TOL = {d: dict(rtol=torch.finfo(d).eps, atol=1e-7) for d in (torch.bfloat16, torch.float16)}

SIZES = [17, 0, 1000, 1, 33, 4099]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RULES = [("update", True), ("gradient", True), ("gradient", False)]


def make_group(device, seed, with_momentum_state=True):
    gen = torch.Generator().manual_seed(seed)
    params, grads, s1, s2, codes = [], [], [], [], []
    for k, n in enumerate(SIZES):
        dtype = DTYPES[k % len(DTYPES)]
        params.append(torch.randn(n, generator=gen).to(dtype).to(device))
        grads.append(torch.randn(n, generator=gen).to(dtype).to(device))
        s1.append(torch.randn(n, generator=gen).mul_(0.1).to(device))
        s2.append(torch.rand(n, generator=gen).mul_(0.1).to(device))
        r = torch.randn(n, generator=gen)
        r[: n // 5] = 0.0
        c = ref.pack_signs_(r, torch.empty(ref.num_code_words(n), dtype=torch.int32)).to(device)
        codes.append(c if k % 3 != 1 else None)  # some tensors have no reference
    return params, grads, s1, s2, codes


def cpu_clone(xs):
    return [None if x is None else x.detach().cpu().clone() for x in xs]


def assert_state_close(actual, expected, msg):
    for k, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.cpu(), e, **STATE_TOL, msg=f"{msg} tensor {k}")


def assert_lists_close(actual, expected, msg):
    for k, (a, e) in enumerate(zip(actual, expected)):
        tol = LOW_PRECISION_TOL[e.dtype] if e.dtype != torch.float32 else PARAM_TOL[torch.float32]
        torch.testing.assert_close(a.cpu().float(), e.float(), **tol, msg=f"{msg} tensor {k}")


@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r[0]}-{'strict' if r[1] else 'soft'}")
def test_adam_multi_matches_reference_loop(backend, decoupled, rule):
    device, _ = backend
    criterion, strict = rule
    params, grads, m, v, codes = make_group(device, seed=1)
    rp, rg, rm, rv, rc = (cpu_clone(x) for x in (params, grads, m, v, codes))
    for step in (1, 2, 7):
        # step and lr as device tensors: the CUDA-graph-friendly form.
        step_t = torch.tensor(float(step), dtype=torch.float64, device=device)
        lr_t = torch.tensor(0.05, device=device)
        hyper = (0.9, 0.999, 1e-3, 0.1, decoupled, criterion, strict)
        counts = mt.cpl_adam_step_multi_(params, grads, m, v, codes, step_t, lr_t, *hyper)
        rcounts = mt.reference_adam_step_multi_(rp, rg, rm, rv, rc, step, 0.05, *hyper)
        assert counts.dtype == torch.int64 and counts.shape == (len(SIZES),)
        assert torch.equal(counts.cpu(), rcounts), f"step={step}"
        assert int(rcounts.sum()) > 0  # the rule froze something: counts are not trivially 0
        assert_lists_close(params, rp, f"param step={step}")
        assert_state_close(m, rm, f"exp_avg step={step}")
        assert_state_close(v, rv, f"exp_avg_sq step={step}")


@pytest.mark.parametrize("momentum,nesterov,dampening", [(0.0, False, 0.0), (0.9, False, 0.1), (0.9, True, 0.0)],
                         ids=["plain", "momentum", "nesterov"])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r[0]}-{'strict' if r[1] else 'soft'}")
def test_sgd_multi_matches_reference_loop(backend, momentum, nesterov, dampening, rule):
    device, _ = backend
    criterion, strict = rule
    params, grads, bufs, _, codes = make_group(device, seed=2)
    rp, rg, rb, rc = (cpu_clone(x) for x in (params, grads, bufs, codes))
    for step in (1, 2, 3):
        hyper = (momentum, dampening, 0.01, nesterov, step == 1, criterion, strict)
        counts = mt.cpl_sgd_step_multi_(params, grads, bufs if momentum else None, codes,
                                        torch.tensor(0.05, device=device), *hyper)
        rcounts = mt.reference_sgd_step_multi_(rp, rg, rb if momentum else None, rc, 0.05, *hyper)
        assert torch.equal(counts.cpu(), rcounts), f"step={step}"
        assert int(rcounts.sum()) > 0
        assert_lists_close(params, rp, f"param step={step}")
        if momentum:
            assert_state_close(bufs, rb, f"buffer step={step}")


def test_multi_without_codes_counts_zero_and_equals_single_steps():
    params, grads, m, v, _ = make_group("cpu", seed=3)
    rp, rg, rm, rv = (cpu_clone(x) for x in (params, grads, m, v))
    counts = mt.cpl_adam_step_multi_(params, grads, m, v, None, 1, 0.05, 0.9, 0.999, 1e-8, 0.01, True)
    assert torch.equal(counts, torch.zeros(len(SIZES), dtype=torch.int64))
    for p, g, mm, vv in zip(rp, rg, rm, rv):
        ref.cpl_adam_step_(p, g, mm, vv, None, 1, 0.05, 0.9, 0.999, 1e-8, 0.01, True, "update", True)
    assert_lists_close(params, rp, "param")


def test_multi_validates_lists():
    params, grads, m, v, codes = make_group("cpu", seed=4)
    with pytest.raises(ValueError, match="'grads' has"):
        mt.cpl_adam_step_multi_(params, grads[:-1], m, v, codes, 1, 0.1, 0.9, 0.999, 1e-8, 0.0, True)
    with pytest.raises(ValueError, match="'codes'"):
        bad = list(codes)
        bad[0] = torch.zeros(1, dtype=torch.int32)  # built for another tensor
        mt.cpl_adam_step_multi_(params, grads, m, v, bad, 1, 0.1, 0.9, 0.999, 1e-8, 0.0, True)
    with pytest.raises(ValueError, match="momentum_buffers"):
        mt.cpl_sgd_step_multi_(params, grads, None, codes, 0.1, momentum=0.9)
    assert mt.cpl_sgd_step_multi_([], [], None, None, 0.1).shape == (0,)
