"""MoFOAdamW (cpl_kernels/optim/mofo.py) against a plain PyTorch MoFO written here, with and without
a CPL reference, over 60 steps; its threshold's error bound on large tensors; ties; errors;
checkpoints. The engine kind "mofo" itself is in tests/test_engine.py's table."""
import math

import pytest
import torch

import cpl_kernels
from cpl_kernels import reference as ref
from cpl_kernels.optim import _momentum_filter as mf

# As tests/test_optim_rule.py against its plain rule over 50+ steps: the plain step rounds u
# differently (torch divides by a scalar as a multiply by its reciprocal), a few ulps of p after
# 60 steps; a wrong update (lr = 0.05) is off by 1e-3 or more.
TOL = dict(rtol=1e-5, atol=1e-6)
SHAPES = [(1,), (17,), (1000,), (64, 48)]


# ---- a plain MoFO, written from the rule (the authors' AdamW_MoFO, decay only where updated) ----

def plain_mofo_step_(p, g, m, v, step, lr, beta1, beta2, eps, wd, alpha, r=None, criterion="update",
                     strict=True):
    """One MoFO step of one tensor in plain PyTorch (fp32). r: the reference gradient (its sign is
    what CPL uses) or None. Returns the elements updated."""
    if r is not None and criterion == "gradient":
        collaborative = ~(((g > 0) & (r < 0)) | ((g < 0) & (r > 0)))
        g = torch.where(collaborative, g, torch.zeros_like(g))
    m.mul_(beta1).add_((1 - beta1) * g)
    v.mul_(beta2).add_(((1 - beta2) * g) * g)
    k = max(1, int(alpha * m.numel()))
    top = m.abs().flatten().topk(k).values.min()
    keep = m.abs() >= top
    bc1 = 1 - beta1 ** step
    bc2 = math.sqrt(1 - beta2 ** step)
    u = (m / bc1) / (v.sqrt() / bc2 + eps) + wd * p
    if r is not None:
        if criterion == "update":
            keep &= ~(((u > 0) & (r < 0)) | ((u < 0) & (r > 0)))
        elif strict:
            keep &= collaborative
    p.sub_(torch.where(keep, lr * u, torch.zeros_like(u)))
    return keep


RULES = [(None, "update", True), ("ref", "update", True), ("ref", "gradient", True), ("ref", "gradient", False)]


def rule_id(rule):
    return "noref" if rule[0] is None else f"{rule[1]}-{'strict' if rule[2] else 'soft'}"


def _run(alpha, wd, rule, steps=60, seed=0, checkpoint_at=None):
    gen = torch.Generator().manual_seed(seed)
    with_ref, criterion, strict = rule
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    plain = [p.detach().clone() for p in params]
    ms = [torch.zeros_like(p) for p in plain]
    vs = [torch.zeros_like(p) for p in plain]
    refs = [torch.randn(s, generator=gen) for s in SHAPES] if with_ref else [None] * len(SHAPES)
    for r in refs:
        if r is not None:
            r[torch.rand(r.shape, generator=gen) < 0.2] = 0.0  # untouched elements: collaborative
    opt = cpl_kernels.MoFOAdamW(params, lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd, alpha=alpha,
                                criterion=criterion, strict=strict)
    if with_ref:
        opt.set_reference_from_grads(refs)
    for step in range(1, steps + 1):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, (q, g) in enumerate(zip(plain, grads)):
            keep = plain_mofo_step_(q, g, ms[i], vs[i], step, 0.05, 0.9, 0.99, 1e-6, wd, alpha, refs[i],
                                    criterion, strict)
            st = opt.state[params[i]]
            # The filter depends on m alone (multiplies and adds, the same roundings): exact.
            assert torch.equal(st["exp_avg"], ms[i]), (step, i)
            assert torch.equal(st["exp_avg_sq"], vs[i]), (step, i)
            # Elements not updated keep their value bit for bit, decay included.
            assert torch.equal(params[i].detach()[~keep], before[i][~keep]), (step, i)
            torch.testing.assert_close(params[i].detach(), q, **TOL)
        if checkpoint_at == step:
            sd = opt.state_dict()
            opt = cpl_kernels.MoFOAdamW(params, lr=1.0, alpha=0.9)  # replaced by the checkpoint
            opt.load_state_dict(sd)
            assert [g["alpha"] for g in opt.param_groups] == [alpha]
    return params, opt


@pytest.mark.parametrize("rule", RULES, ids=rule_id)
@pytest.mark.parametrize("alpha, wd", [(0.1, 0.0), (0.15, 0.1), (0.5, 0.01)])
def test_matches_plain_mofo_over_60_steps(alpha, wd, rule):
    _run(alpha, wd, rule)


def test_state_dict_round_trip_mid_run_resumes_exactly():
    rule = ("ref", "gradient", True)
    a, _ = _run(0.15, 0.1, rule, steps=40)
    b, _ = _run(0.15, 0.1, rule, steps=40, checkpoint_at=17)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_alpha_one_is_cpladamw_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    r = [torch.randn(s, generator=gen) for s in SHAPES]
    oa = cpl_kernels.MoFOAdamW(a, lr=0.05, weight_decay=0.1, alpha=1.0, criterion="gradient")
    ob = cpl_kernels.CPLAdamW(b, lr=0.05, weight_decay=0.1, criterion="gradient")
    oa.set_reference_from_grads(r)
    ob.set_reference_from_grads(r)
    for _ in range(10):
        g = [torch.randn(s, generator=gen) for s in SHAPES]
        for p, q, x in zip(a, b, g):
            p.grad, q.grad = x.clone(), x.clone()
        oa.step()
        ob.step()
        assert oa.frozen_counts == ob.frozen_counts
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_per_group_alpha_and_kept_fraction():
    gen = torch.Generator().manual_seed(4)
    w = torch.nn.Parameter(torch.randn(200, 50, generator=gen))
    norm = torch.nn.Parameter(torch.randn(50, generator=gen))
    opt = cpl_kernels.MoFOAdamW([{"params": [w]}, {"params": [norm], "alpha": 1.0}], lr=0.05, alpha=0.1)
    w0, n0 = w.detach().clone(), norm.detach().clone()
    w.grad, norm.grad = torch.randn(200, 50, generator=gen), torch.randn(50, generator=gen)
    opt.step()
    assert int((w != w0).sum()) == 1000  # floor(0.1 * 10000), no ties among random momenta
    assert bool((norm != n0).all())      # alpha 1: every element (AdamW)
    assert opt.kept_fraction == pytest.approx((1000 + 50) / 10050)


def test_ties_at_the_threshold_all_pass():
    """Deterministic ties: every element whose |m_new| equals the k-th largest is updated."""
    p = torch.nn.Parameter(torch.zeros(100))
    opt = cpl_kernels.MoFOAdamW([p], lr=0.05, weight_decay=0.0, alpha=0.1)
    g = torch.zeros(100)
    g[:5] = 2.0
    g[5:30] = 1.0   # 25 elements tie at the 10th largest |m|
    p.grad = g
    opt.step()
    assert torch.equal(p.detach() != 0, g != 0)  # 30 updated, k = 10
    assert opt.kept_fraction == pytest.approx(0.30)


# ---- the sampled threshold (tensors above mf.SAMPLE elements) ----------------------------------

def _momenta(kind, n, gen):
    if kind == "normal":
        return torch.randn(n, generator=gen)
    if kind == "heavy":  # Student t with 1.5 degrees of freedom: a few huge momenta
        z = torch.randn(n, generator=gen)
        chi = torch.distributions.Chi2(torch.tensor(1.5)).sample((n,))
        return z / (chi / 1.5).sqrt()
    rows, cols = n // 1024, 1024
    if kind == "rows":  # per-row scales over three decades: a line's 16 elements alike (the worst case)
        scale = 10.0 ** (-3 * torch.rand(rows, 1, generator=gen))
        return (torch.randn(rows, cols, generator=gen) * scale).reshape(-1)
    if kind == "columns":  # per-column scales over three decades (a weight matrix)
        scale = 10.0 ** (-3 * torch.rand(cols, generator=gen))
        return (torch.randn(rows, cols, generator=gen) * scale).reshape(-1)
    if kind == "zero-rows":  # an embedding: the last 40% of its rows never got a gradient
        x = torch.randn(rows, cols, generator=gen)
        x[int(rows * 0.6):] = 0.0
        return x.reshape(-1)
    raise AssertionError(kind)


# Measured |kept - alpha| (docs/optimizers.md lists them): at most 0.0078, against bounds of
# 0.034 / 0.056 / 0.078 at alpha 0.05 / 0.15 / 0.5.
@pytest.mark.parametrize("kind", ["normal", "heavy", "columns", "rows", "zero-rows"])
@pytest.mark.parametrize("alpha", [0.05, 0.15, 0.5])
def test_sampled_threshold_keeps_alpha_within_the_stated_bound(kind, alpha):
    n = (1 << 22) + 1024 * 7  # 4.2M: 64x the sample
    gen = torch.Generator().manual_seed(11)
    m = _momenta(kind, n, gen)
    g = _momenta(kind, n, gen)
    t, kept_estimate = mf.threshold(m, g, alpha, 0.9)
    exact = mf.new_momentum(m, g, 0.9, None, "update", None, None)
    kept = (exact >= t).double().mean().item()
    bound = mf.kept_error_bound(alpha)
    assert abs(kept - alpha) <= bound, (kept, alpha, bound)
    assert abs(kept_estimate / n - kept) <= bound


def test_exact_threshold_below_the_sample_size():
    gen = torch.Generator().manual_seed(5)
    m, g = torch.randn(mf.SAMPLE, generator=gen), torch.randn(mf.SAMPLE, generator=gen)
    t, kept = mf.threshold(m, g, 0.15, 0.9)
    exact = mf.new_momentum(m, g, 0.9, None, "update", None, None)
    k = int(0.15 * mf.SAMPLE)
    assert kept == k and int((exact >= t).sum()) == k
    assert t == exact.topk(k).values.min().item()


@pytest.mark.parametrize("criterion", ["update", "gradient"])
def test_engine_updates_exactly_the_elements_at_or_above_the_threshold(criterion):
    """A tensor above the sample size: the step moves exactly {|m_new| >= t} (and, with a
    reference, not the conflicting ones), t being the threshold the optimizer computes."""
    n = 3 * mf.SAMPLE + 5
    gen = torch.Generator().manual_seed(6)
    p = torch.nn.Parameter(torch.randn(n, generator=gen))
    r = torch.randn(n, generator=gen)
    opt = cpl_kernels.MoFOAdamW([p], lr=0.05, alpha=0.15, criterion=criterion)
    opt.set_reference_from_grads([r])
    for _ in range(3):
        g = torch.randn(n, generator=gen) * 100.0
        grad_scale = torch.tensor(64.0)  # GradScaler's fused protocol: the threshold sees g / 64
        m_before = opt.state[p]["exp_avg"].clone() if "exp_avg" in opt.state[p] else torch.zeros(n)
        codes = opt.state[p]["cpl_codes"]
        t, _ = mf.threshold(m_before, g, 0.15, 0.9, codes, criterion, grad_scale)
        before = p.detach().clone()
        p.grad = g
        opt.grad_scale = grad_scale
        opt.step()
        m_new = opt.state[p]["exp_avg"]
        passes = m_new.abs() >= t
        moved = p.detach() != before
        assert bool((moved <= passes).all())
        signs = ref.unpack_signs(codes, n)
        if criterion == "gradient":
            collaborative = ~(((g > 0) & (signs < 0)) | ((g < 0) & (signs > 0)))
            assert torch.equal(moved, passes & collaborative)
        else:
            assert bool(moved[passes & (signs == 0)].all())  # no reference there: filter only
        assert abs(passes.double().mean().item() - 0.15) <= mf.kept_error_bound(0.15)


# ---- arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_bad_alpha_is_refused_by_name(alpha):
    with pytest.raises(ValueError, match=r"MoFOAdamW: alpha must be a number in \(0, 1\]"):
        cpl_kernels.MoFOAdamW([torch.nn.Parameter(torch.zeros(3))], alpha=alpha)


def test_bad_group_alpha_is_refused_and_writes_nothing():
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match=r"MoFOAdamW: the param group's 'alpha' must be"):
        cpl_kernels.MoFOAdamW([{"params": [p], "alpha": 2.0}])
    opt = cpl_kernels.MoFOAdamW([p], alpha=0.5)
    opt.param_groups[0]["alpha"] = 0.0
    p.grad = torch.randn(10)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"'alpha' must be a number in \(0, 1\]"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state[p]


def test_torch_adamw_checkpoint_loads_and_keeps_alpha():
    p = torch.nn.Parameter(torch.randn(10))
    t = torch.optim.AdamW([p])
    p.grad = torch.randn(10)
    t.step()
    opt = cpl_kernels.MoFOAdamW([p], alpha=0.2)
    opt.load_state_dict(t.state_dict())
    assert opt.param_groups[0]["alpha"] == 0.2
    assert torch.equal(opt.state[p]["exp_avg"], t.state[p]["exp_avg"])


def test_a_mofo_checkpoint_is_refused_by_cpladamw():
    p = torch.nn.Parameter(torch.randn(10))
    opt = cpl_kernels.MoFOAdamW([p])
    p.grad = torch.randn(10)
    opt.step()
    other = cpl_kernels.CPLAdamW([p])
    with pytest.raises(ValueError, match=r"saved by MoFOAdamW.*load it into MoFOAdamW"):
        other.load_state_dict(opt.state_dict())
    assert not other.state


@pytest.mark.parametrize("criterion", ["update", "gradient"])
def test_batched_thresholds_equal_the_per_tensor_ones(criterion):
    gen = torch.Generator().manual_seed(8)
    sizes = [5, mf.SAMPLE, mf.SAMPLE + 17, 3 * mf.SAMPLE, 100_000]
    tensors = []
    for i, n in enumerate(sizes):
        m, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen).bfloat16()
        codes = ref.pack_signs_(torch.randn(n, generator=gen), torch.empty(ref.num_code_words(n),
                                                                          dtype=torch.int32)) if i % 2 else None
        tensors.append((m, g, codes))
    scale = torch.tensor(3.0)
    for alpha in (0.15, 0.7, 1.0):
        want = [mf.threshold(m, g, alpha, 0.9, c, criterion, scale) for m, g, c in tensors]
        assert mf.thresholds(tensors, alpha, 0.9, criterion, scale) == want
