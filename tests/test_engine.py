"""The step engine (cpl::cpl_step_) on every backend against the reference, table-driven over
kinds x rules x dtypes x shapes; the reference against torch.optim, a plain Lion and a plain MoFO
filter; non-finite
gradients, GradScaler's protocol and argument errors."""
import itertools

import pytest
import torch

from cpl_kernels import engine, kinds, reference as ref, reference_step
from tolerances import PARAM_DTYPES, PARAM_TOL, STATE_TOL, shapes_for

# kind -> hyper lists to run (the order of kinds.KINDS[kind].hyper)
HYPERS = {
    "adamw": [[0.9, 0.999, 1e-3, 0.1], [0.8, 0.99, 1e-8, 0.0]],
    "adam": [[0.9, 0.999, 1e-3, 0.1]],
    "sgd": [[0.0, 0.0, 0.0, 0.0, 0.0], [0.9, 0.1, 0.05, 0.0, 0.0], [0.9, 0.0, 0.0, 1.0, 0.0],
            [0.9, 0.0, 0.01, 0.0, 1.0]],
    "lion": [[0.9, 0.99, 0.1], [0.95, 0.98, 0.0]],
    # threshold on |m_new| (about 0.13 here): 0.08 keeps about half, 0.3 a few, 0 all (AdamW)
    "mofo": [[0.9, 0.999, 1e-3, 0.1, 0.08], [0.8, 0.99, 1e-8, 0.0, 0.3], [0.9, 0.999, 1e-8, 0.0, 0.0]],
}
CASES = [(k, h) for k, hs in HYPERS.items() for h in hs]
RULES = [("update", True, False), ("update", True, True), ("gradient", True, True), ("gradient", False, True)]


def case_id(case):
    return f"{case[0]}-" + "-".join(f"{x:g}" for x in case[1])


def rule_id(rule):
    return f"{rule[0]}-{'strict' if rule[1] else 'soft'}-{'codes' if rule[2] else 'nocodes'}"


def inputs(n, dtype, kind, hyper, seed, nonfinite=False):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g).to(dtype)
    grad = torch.randn(n, generator=g).to(dtype)
    if nonfinite and n > 3:
        grad[1], grad[n // 2], grad[-1] = float("nan"), float("inf"), float("-inf")
    r = torch.randn(n, generator=g)
    if n > 4:
        r[torch.randint(0, n, (n // 5,), generator=g)] = 0.0
    codes = ref.pack_signs_(r, torch.empty(ref.num_code_words(n), dtype=torch.int32))
    slots = kinds.state_slots(kinds.KINDS[kind], hyper)
    s1 = [torch.randn(n, generator=g).mul_(0.1)] if slots >= 1 else []
    s2 = [torch.rand(n, generator=g).mul_(0.1)] if slots >= 2 else []
    return p, grad, s1, s2, codes


def clones(ts):
    return [t.clone() for t in ts]


def run_both(device, kind, hyper, n, dtype, rule, steps=(1, 2, 7), nonfinite=False, grad_scale=None):
    criterion, strict, with_codes = rule
    p, grad, s1, s2, codes = inputs(n, dtype, kind, hyper, seed=n, nonfinite=nonfinite)
    codes = codes if with_codes else None
    mine = [p.to(device), grad.to(device), [t.to(device) for t in s1], [t.to(device) for t in s2],
            None if codes is None else codes.to(device)]
    theirs = [p.clone(), grad.clone(), clones(s1), clones(s2), codes]
    for step in steps:
        scale = None if grad_scale is None else torch.tensor(grad_scale, device=device)
        got = engine.cpl_step_([mine[0]], [mine[1]], mine[2], mine[3], [mine[4]], kind, step, 0.05, hyper,
                               criterion, strict, True, scale, None)
        want = reference_step.cpl_step_([theirs[0]], [theirs[1]], theirs[2], theirs[3], [theirs[4]], kind,
                                        float(step), 0.05, hyper, criterion, strict, True,
                                        None if grad_scale is None else torch.tensor(grad_scale), None)
        yield step, got.cpu(), want, mine, theirs


@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("rule", RULES, ids=rule_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_engine_matches_reference(backend, case, rule, dtype):
    device, name = backend
    kind, hyper = case
    # The Triton interpreter runs a kernel at Python speed: fewer sizes there (tests/
    # test_engine_gpu_compile.py covers multi-tensor tables and misaligned views).
    sizes = [1, 17, 33, 1000] if name == "triton" and device == "cpu" else shapes_for(name)
    for n in sizes:
        for step, got, want, mine, theirs in run_both(device, kind, hyper, n, dtype, rule):
            msg = f"{name} n={n} step={step}"
            assert got.shape == (2, 1) and got.dtype == torch.int64
            exact = name == "cpp" or dtype == torch.float32
            if exact:  # fp32 math, one rounding per operation: bit for bit (docs/design.md section 4)
                assert torch.equal(got, want), msg
                assert torch.equal(mine[0].cpu(), theirs[0]), msg
                for a, b in zip(mine[2] + mine[3], theirs[2] + theirs[3]):
                    assert torch.equal(a.cpu(), b), msg
            else:
                torch.testing.assert_close(mine[0].cpu().float(), theirs[0].float(), **PARAM_TOL[torch.float32])
                for a, b in zip(mine[2] + mine[3], theirs[2] + theirs[3]):
                    torch.testing.assert_close(a.cpu(), b, **STATE_TOL)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_nonfinite_gradients_leave_elements_untouched(backend, case):
    device, name = backend
    kind, hyper = case
    n = 33
    p0, _, s10, s20, _ = inputs(n, torch.float32, kind, hyper, seed=n, nonfinite=True)
    for step, got, want, mine, theirs in run_both(device, kind, hyper, n, torch.float32,
                                                  ("gradient", True, True), steps=(1, 2), nonfinite=True):
        assert torch.equal(got, want)
        assert got[1, 0] == 3
        bad = torch.tensor([1, n // 2, n - 1])
        assert torch.equal(mine[0].cpu()[bad], p0[bad])  # never written
        for a, b in zip(mine[2] + mine[3], s10 + s20):
            assert torch.equal(a.cpu()[bad], b[bad])
        assert torch.isfinite(mine[0].cpu()).all()


@pytest.mark.parametrize("case", CASES[:1] + CASES[3:4], ids=case_id)
def test_grad_scale_unscales_on_the_fly_and_found_inf_skips(backend, case):
    device, name = backend
    kind, hyper = case
    n = 100
    p, grad, s1, s2, codes = inputs(n, torch.float32, kind, hyper, seed=3)
    scaled = (grad * 1024.0).to(device)
    a = [p.clone().to(device), [t.clone().to(device) for t in s1], [t.clone().to(device) for t in s2]]
    b = [p.clone(), clones(s1), clones(s2)]
    engine.cpl_step_([a[0]], [scaled], a[1], a[2], [codes.to(device)], kind, 1, 0.05, hyper,
                     grad_scale=torch.tensor(1024.0, device=device))
    reference_step.cpl_step_([b[0]], [grad], b[1], b[2], [codes], kind, 1.0, 0.05, hyper, "update", True,
                             True, None, None)
    assert torch.equal(a[0].cpu(), b[0])  # 1024 is a power of two: unscaling is exact
    before = [t.clone() for t in [a[0]] + a[1] + a[2]]
    counts = engine.cpl_step_([a[0]], [scaled], a[1], a[2], [codes.to(device)], kind, 2, 0.05, hyper,
                              grad_scale=torch.tensor(1024.0, device=device),
                              found_inf=torch.tensor(1.0, device=device))
    assert counts.cpu().sum() == 0
    assert all(torch.equal(x, y) for x, y in zip([a[0]] + a[1] + a[2], before))


def test_reference_engine_matches_torch_optim():
    """No reference set: each kind is its torch.optim counterpart (torch rounds differently: FMAs)."""
    gen = torch.Generator().manual_seed(0)
    for kind, make, hyper_of in [
        ("adamw", lambda q: torch.optim.AdamW(q, lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1),
         lambda: [0.9, 0.99, 1e-6, 0.1]),
        ("adam", lambda q: torch.optim.Adam(q, lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1),
         lambda: [0.9, 0.99, 1e-6, 0.1]),
    ]:
        p = torch.randn(500, generator=gen)
        q = torch.nn.Parameter(p.clone())
        theirs = make([q])
        m, v = torch.zeros(500), torch.zeros(500)
        for step in range(1, 21):
            g = torch.randn(500, generator=gen)
            q.grad = g.clone()
            theirs.step()
            reference_step.cpl_step_([p], [g], [m], [v], [None], kind, float(step), 0.05, hyper_of(), "update",
                                     True, True, None, None)
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)
    for momentum, dampening, wd, nesterov in [(0.0, 0.0, 0.0, False), (0.9, 0.1, 0.01, False), (0.9, 0.0, 0.0, True)]:
        p = torch.randn(500, generator=gen)
        q = torch.nn.Parameter(p.clone())
        theirs = torch.optim.SGD([q], lr=0.05, momentum=momentum, dampening=dampening, weight_decay=wd,
                                 nesterov=nesterov)
        buf = [torch.zeros(500)] if momentum else []
        for step in range(1, 21):
            g = torch.randn(500, generator=gen)
            q.grad = g.clone()
            theirs.step()
            reference_step.cpl_step_([p], [g], buf, [], [None], "sgd", float(step), 0.05,
                                     [momentum, dampening, wd, float(nesterov), float(step == 1)], "update",
                                     True, True, None, None)
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)


def plain_lion_(p, g, m, lr, beta1, beta2, wd):
    """Lion as its paper writes it (Chen et al. 2023, Algorithm 2), in plain PyTorch."""
    c = beta1 * m + (1 - beta1) * g
    p.mul_(1 - lr * wd).sub_(lr * torch.sign(c))
    m.mul_(beta2).add_((1 - beta2) * g)


def test_reference_lion_matches_plain_lion():
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(400, generator=gen)
    q, m, mq = p.clone(), torch.zeros(400), torch.zeros(400)
    for step in range(1, 31):
        g = torch.randn(400, generator=gen)
        reference_step.cpl_step_([p], [g], [m], [], [None], "lion", float(step), 1e-3, [0.9, 0.99, 0.1],
                                 "update", True, True, None, None)
        plain_lion_(q, g, mq, 1e-3, 0.9, 0.99, 0.1)
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m, mq, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(kind="adamax"), r"'kind' must be one of"),
    (dict(kind="mofo", hyper=[0.9, 0.999, 1e-8, 0.0, -0.1]), r"'threshold' must be >= 0"),
    (dict(hyper=[0.9, 0.999, 1e-8]), r"'hyper' for kind 'adamw' holds 3 values; expected 4"),
    (dict(hyper=[0.9, 1.5, 1e-8, 0.0]), r"'beta2' must be in \[0, 1\)"),
    (dict(step=0), r"'step' must be a finite number >= 1"),
    (dict(lr=float("nan")), r"'lr' must be a finite number"),
    (dict(state2=[]), r"'state2' has 0 entries but 'params' has 2"),
    (dict(criterion="sign"), r"criterion"),
    (dict(grads="x"), r"'grads' must be a list"),
    # Per-entry checks (each names the entry of the list; the last entry is the bad one).
    (dict(grads=[torch.randn(10), torch.randn(21)]), r"'grads\[1\]'.*shape"),
    (dict(grads=[torch.randn(10), torch.randn(20, dtype=torch.float64)]), r"'grads\[1\]'.*dtype"),
    (dict(params=[torch.randn(10), torch.randn(20, dtype=torch.float64)]), r"'params\[1\]'.*dtype"),
    (dict(state1=[torch.zeros(10), torch.zeros(19)]), r"'state1\[1\]'.*elements"),
    (dict(state2=[torch.zeros(10), torch.zeros(20, dtype=torch.float16)]), r"'state2\[1\]'.*dtype"),
    (dict(state2=[torch.zeros(10), torch.zeros(20, device="meta")]), r"'state2\[1\]' is on meta"),
    (dict(grads=[torch.randn(10), torch.randn(40)[::2]]), r"'grads\[1\]'.*contiguous"),
    (dict(grads=[torch.randn(10), torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), (20,))]),
     r"'grads\[1\]'.*dense"),
    (dict(codes=[None, torch.zeros(1, dtype=torch.int32)]), r"'codes\[1\]' holds 1 int32 words but 20 elements need 2"),
    (dict(codes=[None, torch.zeros(2, dtype=torch.int64)]), r"'codes\[1\]'.*dtype"),
    (dict(lr=-1.0), r"'lr' must be a finite number >= 0"),
    (dict(hyper=[0.9, 0.999, float("nan"), 0.0]), r"'eps'.*finite"),
])
def test_errors_name_the_argument_and_write_nothing(bad, match):
    params = [torch.randn(10), torch.randn(20)]
    args = dict(params=params, grads=[torch.randn(10), torch.randn(20)], state1=[torch.zeros(10), torch.zeros(20)],
                state2=[torch.zeros(10), torch.zeros(20)], codes=None, kind="adamw", step=1, lr=0.1,
                hyper=[0.9, 0.999, 1e-8, 0.0], criterion="update")
    args.update(bad)
    before = [t.clone() for t in params]
    with pytest.raises(ValueError, match=match):
        engine.cpl_step_(**args)
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_a_bad_entry_late_in_the_list_writes_nothing(backend):
    device, name = backend
    params = [torch.randn(10, device=device), torch.randn(20, device=device)]
    grads = [torch.randn(10, device=device), torch.randn(20, device=device)]
    state = [torch.zeros(10, device=device), torch.zeros(19, device=device)]  # the second is wrong
    before = [t.clone() for t in params]
    with pytest.raises(ValueError, match=r"'state1\[1\]' has 19 elements; expected 20"):
        engine.cpl_step_(params, grads, state, [], None, "lion", 1, 0.1, [0.9, 0.99, 0.0])
    assert all(torch.equal(a, b) for a, b in zip(params, before))


@pytest.mark.parametrize("kind", list(kinds.KINDS))
def test_every_kind_has_a_direction_and_scalars(kind):
    assert kind in reference_step.DIRECTIONS
    k = kinds.KINDS[kind]
    reference_step.scalars(k, 1.0, 0.1, dict(zip(k.hyper, HYPERS[kind][0])))


def test_empty_list():
    assert engine.cpl_step_([], [], [], [], None, "sgd", 1, 0.1, [0.0] * 5).shape == (2, 0)
