"""CPLAdamW8bit / CPLAdam8bit: the CPL rule on 8-bit blockwise state (cpl_kernels/optim/adam8bit.py).

Parity anchors: with no reference, CPLAdamW8bit tracks torchao's AdamW8bit (same maps, block size
and small-tensor threshold; torchao installed as a test dependency) over 100 steps; and the CPL
rule is checked independently of the quantization (criterion "gradient": the frozen elements are
exactly those whose gradient conflicts with the reference, and they do not move)."""
import io
import warnings

import pytest
import torch

from cpl_kernels import CPLAdam8bit, CPLAdamW, CPLAdamW8bit, quant8
from cpl_kernels import reference as ref

# Parity with torchao's AdamW8bit over 100 steps (measured 0.0088-0.0098 for the weight matrices,
# 0.0075-0.0085 before v's floor, and 0.001 for the fp32-state biases; the two differ in rounding:
# torchao applies the decay first and updates m, v by lerp, and has no floor on v): per parameter,
# |p_ours - p_torchao| / |p_torchao - p_start| (Frobenius norms).
TORCHAO_REL_DEV = 0.03


def mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                               torch.nn.GELU(), torch.nn.Linear(256, 16))


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(512, 64, generator=gen), torch.randn(512, 16, generator=gen)


def train(model, opt, steps, X, Y, seed=0, before_step=None):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(X), (64,), generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X[idx]), Y[idx])
        loss.backward()
        if before_step:
            before_step()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tracks_torchao_adamw8bit_without_reference(monkeypatch):
    ao = pytest.importorskip("torchao.optim")
    # torchao compiles its step with torch.compile (minutes of C++ compilation on CPU); eager runs
    # the same maths.
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    X, Y = data()
    ours, theirs = mlp(1), mlp(1)
    start = [p.detach().clone() for p in ours.parameters()]
    opt = CPLAdamW8bit(ours.parameters(), lr=1e-3, weight_decay=0.01)
    opt.clear_reference()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(ours, opt, 100, X, Y)
        train(theirs, ao.AdamW8bit(theirs.parameters(), lr=1e-3, weight_decay=0.01), 100, X, Y)
    for (name, a), b, p0 in zip(ours.named_parameters(), theirs.parameters(), start):
        moved = (b - p0).norm()
        assert moved > 0
        assert (a - b).norm() / moved <= TORCHAO_REL_DEV, name
    loss_a = torch.nn.functional.mse_loss(ours(X), Y).item()
    loss_b = torch.nn.functional.mse_loss(theirs(X), Y).item()
    assert abs(loss_a - loss_b) <= 0.005 * loss_b


def test_state_format_and_bytes():
    big, small = torch.nn.Parameter(torch.randn(1024, 1024)), torch.nn.Parameter(torch.randn(4095))
    opt = CPLAdamW8bit([big, small], lr=1e-3)
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.set_reference_from_grads()
    opt.step()
    st = opt.state[big]
    assert set(st) == {"step", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax", "cpl_codes"}
    assert st["exp_avg_codes"].dtype == torch.uint8 and st["exp_avg_codes"].numel() == big.numel()
    assert st["exp_avg_absmax"].numel() == big.numel() // 256
    assert set(opt.state[small]) == {"step", "exp_avg", "exp_avg_sq", "cpl_codes"}  # < 4096: fp32
    bytes_big = sum(t.numel() * t.element_size() for t in st.values())
    assert bytes_big / big.numel() <= 2.35  # 2 + 8/256 + 0.25 + 4 B of step
    assert bytes_big / big.numel() == pytest.approx(2.28125, abs=1e-5)
    assert opt.state_bytes() == bytes_big + sum(t.numel() * t.element_size() for t in opt.state[small].values())


@pytest.mark.parametrize("cls", [CPLAdamW8bit, CPLAdam8bit])
def test_gradient_criterion_freezes_exactly_the_conflicting_elements(cls):
    """Independent of the quantization: with criterion "gradient" (strict), an element is frozen
    iff g * r < 0 (Adam: g with its L2 decay, g + wd * p); frozen elements keep their value, the
    others move."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128))
    opt = cls([p], lr=0.05, weight_decay=0.1, criterion="gradient")
    for _ in range(3):
        r, g = torch.randn_like(p), torch.randn_like(p)
        r[::7] = 0.0
        opt.set_reference_from_grads([r])
        p.grad = g
        before = p.detach().clone()
        opt.step()
        if cls is CPLAdam8bit:
            g = g + torch.tensor(0.1) * before
        conflicting = (g * r) < 0
        assert opt.frozen_counts == [int(conflicting.sum())]
        assert torch.equal(p.detach()[conflicting], before[conflicting])
        assert (p.detach()[~conflicting] != before[~conflicting]).float().mean() > 0.99


def test_update_criterion_counts_against_the_reference_step():
    """criterion "update": the count is that of u * r < 0, with u from the dequantized state;
    the C++ step equals the reference engine bit for bit (tests/test_engine_8bit.py), so here
    the optimizer plumbing: counts and frozen elements agree with a direct engine call."""
    from cpl_kernels import engine
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(8192))
    opt = CPLAdamW8bit([p], lr=0.05, weight_decay=0.1)
    r, g = torch.randn(8192), torch.randn(8192)
    opt.set_reference_from_grads([r])
    p.grad = g
    q, a = [torch.full((8192,), 127, dtype=torch.uint8), torch.zeros(8192, dtype=torch.uint8)], [torch.zeros(32), torch.zeros(32)]
    mine = p.detach().clone()
    counts = engine.cpl_step_8bit_([mine], [g], [q[0]], [a[0]], [q[1]], [a[1]], quant8.qmaps((True, False)),
                                   [ref.pack_signs_(r, torch.empty(512, dtype=torch.int32))], "adamw", 1, 0.05,
                                   [0.9, 0.999, 1e-8, 0.1])
    opt.step()
    assert opt.frozen_counts == [int(counts[0, 0])] and int(counts[0, 0]) > 0
    assert torch.equal(p.detach(), mine)
    assert torch.equal(opt.state[p]["exp_avg_codes"], q[0]) and torch.equal(opt.state[p]["exp_avg_sq_absmax"], a[1])


def test_state_dict_round_trips_bit_exactly():
    X, Y = data(1)
    a = mlp(2)
    opt = CPLAdamW8bit(a.parameters(), lr=1e-3, criterion="gradient")
    refs = [torch.randn_like(p) for p in a.parameters()]
    opt.set_reference_from_grads(refs)
    train(a, opt, 5, X, Y)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    b = mlp(2)
    b.load_state_dict(a.state_dict())
    opt_b = CPLAdamW8bit(b.parameters(), lr=1e-3, criterion="gradient")
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    for pa, pb in zip(a.parameters(), b.parameters()):
        sa, sb = opt.state[pa], opt_b.state[pb]
        assert set(sa) == set(sb)
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    train(a, opt, 5, X, Y, seed=3)
    train(b, opt_b, 5, X, Y, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
        for k in opt.state[pa]:
            assert torch.equal(opt.state[pa][k], opt_b.state[pb][k]), k


def test_loading_an_fp32_checkpoint_is_refused_by_name_and_writes_nothing():
    p = torch.nn.Parameter(torch.randn(64, 128))
    fp32 = CPLAdamW([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    fp32.clear_reference()
    fp32.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt = CPLAdamW8bit([q], lr=1e-3)
    with pytest.raises(ValueError, match=r"fp32 \['exp_avg', 'exp_avg_sq'\].*keeps in 8 bits"):
        opt.load_state_dict(fp32.state_dict())
    assert len(opt.state) == 0


def test_nonfinite_gradients_skip_or_raise():
    p = torch.nn.Parameter(torch.randn(8192))
    opt = CPLAdamW8bit([p], lr=0.05)
    opt.clear_reference()
    p.grad = torch.randn(8192)
    opt.step()
    g = torch.randn(8192)
    g[5], g[6000] = float("nan"), float("inf")
    p.grad = g
    before = p.detach().clone()
    with pytest.warns(RuntimeWarning, match="left untouched"):
        opt.step()
    assert opt.nonfinite_counts == [2]
    assert p[5] == before[5] and p[6000] == before[6000] and torch.isfinite(p).all()
    opt_r = CPLAdamW8bit([p], lr=0.05, check_finite="raise")
    opt_r.clear_reference()
    before = p.detach().clone()
    with pytest.raises(FloatingPointError):
        opt_r.step()
    assert torch.equal(p.detach(), before) and len(opt_r.state) == 0


def test_grad_scaler_protocol():
    torch.manual_seed(3)
    p, q = torch.nn.Parameter(torch.randn(8192)), torch.nn.Parameter(torch.randn(8192))
    q.data.copy_(p.data)
    a, b = CPLAdamW8bit([p], lr=0.05), CPLAdamW8bit([q], lr=0.05)
    a.clear_reference()
    b.clear_reference()
    g = torch.randn(8192)
    p.grad, q.grad = g * 1024, g.clone()
    a.grad_scale = torch.tensor(1024.0)
    a.step()
    b.step()
    assert torch.equal(p, q)  # a power of two: unscaling is exact
    assert torch.equal(a.state[p]["exp_avg_codes"], b.state[q]["exp_avg_codes"])
    a.found_inf = torch.tensor(1.0)
    before = [p.detach().clone()] + [t.clone() for t in a.state[p].values()]
    a.step()
    assert all(torch.equal(x, y) for x, y in zip([p.detach()] + list(a.state[p].values()), before))


def test_tracks_fp32_adamw_loss_curve():
    """8-bit moments train like fp32 ones: the loss after 100 steps is within 2% of CPLAdamW's."""
    X, Y = data(2)
    a, b = mlp(4), mlp(4)
    oa, ob = CPLAdamW8bit(a.parameters(), lr=1e-3), CPLAdamW(b.parameters(), lr=1e-3)
    oa.clear_reference()
    ob.clear_reference()
    la, lb = train(a, oa, 100, X, Y), train(b, ob, 100, X, Y)
    assert la[-1] < 0.9 * la[0]
    final_a = torch.nn.functional.mse_loss(a(X), Y).item()
    final_b = torch.nn.functional.mse_loss(b(X), Y).item()
    assert abs(final_a - final_b) <= 0.02 * final_b


def test_lab_optimizer_adamw8bit():
    """`cpl inject --optimizer adamw8bit`: CPL with CPLAdamW8bit, the baselines with it and no
    reference; static masks (MaskedAdamW, fp32 state) refuse it by name."""
    from cpl_lab import optimizers
    from cpl_lab.config import LabConfig
    cfg = LabConfig(optimizer="adamw8bit").validate()
    p = [torch.nn.Parameter(torch.randn(64, 128))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no reference" warning from the plain optimizer
        plain = optimizers.plain(p, 1e-3, cfg)
        p[0].grad = torch.randn(64, 128)
        plain.step()
    assert type(plain) is CPLAdamW8bit and not plain.has_reference
    assert "exp_avg_codes" in plain.state[p[0]]
    cpl = optimizers.cpl(p, 1e-3, cfg)
    assert type(cpl) is CPLAdamW8bit and cpl.param_groups[0]["criterion"] == cfg.criterion
    with pytest.raises(ValueError, match="adamw8bit"):
        optimizers.masked(p, [torch.ones(64, 128, dtype=torch.bool)], 1e-3, cfg)
