"""Optimizer-level behaviour of the step engine: non-finite gradients skipped per element and
named, GradScaler's fused protocol, torch.compile without recompiles, CPLLion."""
import warnings

import pytest
import torch

from cpl_kernels import CPLAdam, CPLAdamW, CPLLion, CPLSGD, MaskedAdamW
from test_engine import plain_lion_

CPL = [CPLAdamW, CPLAdam, CPLSGD, CPLLion]


def named_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


@pytest.mark.parametrize("cls", CPL)
def test_default_skips_nonfinite_elements_and_names_the_parameter(cls):
    model = named_model()
    opt = cls(model.named_parameters(), lr=0.05)
    opt.clear_reference()
    model(torch.randn(4, 6)).sum().backward()
    quiet(opt.step)
    model(torch.randn(4, 6)).sum().backward()
    model[1].bias.grad[1] = float("nan")
    model[1].weight.grad[0, 2] = float("inf")
    before_b, before_w = model[1].bias.detach().clone(), model[1].weight.detach().clone()
    state_b = {k: v.clone() for k, v in opt.state[model[1].bias].items()}
    with pytest.warns(RuntimeWarning, match=r"left untouched .* 2 parameter\(s\): '1\.weight' \(1\), '1\.bias' \(1\)"):
        opt.step()
    assert opt.nonfinite_counts == [2]
    assert model[1].bias.detach()[1] == before_b[1] and model[1].weight.detach()[0, 2] == before_w[0, 2]
    for k, v in opt.state[model[1].bias].items():
        if k != "step" and v.dim():
            assert v[1] == state_b[k][1]  # its state did not see the NaN either
    assert not torch.equal(model[1].bias.detach(), before_b)  # the finite elements stepped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_check_finite_false_lets_nan_through_like_torch():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = CPLAdamW([p], check_finite=False)
    opt.clear_reference()
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    opt.step()
    assert p.detach()[1].isnan()
    with pytest.raises(ValueError, match="check_finite must be"):
        CPLAdamW([p], check_finite="sometimes")


def no_reference(cls):
    def make(params, **kw):
        opt = cls(params, **kw)
        opt.clear_reference()
        return opt
    return make


def all_active(params, **kw):
    params = list(params)
    return MaskedAdamW(params, masks=[torch.ones_like(p, dtype=torch.bool) for p in params], **kw)


@pytest.mark.parametrize("make,torch_cls,kw", [
    (no_reference(CPLAdamW), torch.optim.AdamW, dict(weight_decay=0.1)),
    (no_reference(CPLAdam), torch.optim.Adam, dict(weight_decay=0.1)),
    (all_active, torch.optim.AdamW, dict(weight_decay=0.1)),  # the masked step's own kernel
], ids=["CPLAdamW", "CPLAdam", "MaskedAdamW"])
def test_grad_scaler_fused_protocol_matches_torch_fused(make, torch_cls, kw):
    """GradScaler hands grad_scale/found_inf to the step (no unscale pass) and skips inf steps."""
    ours, theirs = named_model(), named_model()
    opt_a = make(ours.parameters(), lr=0.01, **kw)
    opt_b = torch_cls(theirs.parameters(), lr=0.01, fused=True, **kw)
    scaler_a, scaler_b = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
    gen = torch.Generator().manual_seed(3)
    for i in range(8):
        x = torch.randn(4, 6, generator=gen)
        for model, opt, scaler in ((ours, opt_a, scaler_a), (theirs, opt_b, scaler_b)):
            opt.zero_grad()
            scaler.scale(model(x).pow(2).sum()).backward()
            if i == 3:  # an overflowing step: both skip it whole
                next(model.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        assert scaler_a.get_scale() == scaler_b.get_scale()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt_a.state[next(ours.parameters())]["step"] == 7  # the skipped step did not count


def test_compiled_training_step_does_not_recompile():
    import torch._dynamo
    torch._dynamo.reset()
    model = named_model()
    opt = CPLAdamW(model.parameters(), lr=0.01)
    opt.clear_reference()

    @torch.compile(backend="eager")
    def train_step(x):
        loss = model(x).pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    gen = torch.Generator().manual_seed(0)
    train_step(torch.randn(4, 6, generator=gen))
    train_step(torch.randn(4, 6, generator=gen))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(12):
            train_step(torch.randn(4, 6, generator=gen))


def test_cpl_lion_without_reference_is_lion():
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50, 7, generator=gen))
    q, m = p.detach().clone(), torch.zeros(50, 7)
    opt = CPLLion([p], lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    opt.clear_reference()
    for _ in range(40):
        g = torch.randn(50, 7, generator=gen)
        p.grad = g.clone()
        opt.step()
        plain_lion_(q, g, m, 3e-3, 0.9, 0.99, 0.1)
    torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-5, atol=1e-6)
    assert opt.state_bytes() == 50 * 7 * 4


@pytest.mark.parametrize("criterion", ["update", "gradient"])
def test_cpl_lion_freezes_conflicting_elements(criterion):
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(400, generator=gen))
    ref = torch.randn(400, generator=gen)
    opt = CPLLion([p], lr=1e-2, weight_decay=0.0, criterion=criterion)
    opt.set_reference_from_grads([ref])
    g = torch.randn(400, generator=gen)
    p.grad = g.clone()
    before = p.detach().clone()
    opt.step()
    moved = p.detach() != before
    u = torch.sign(0.1 * g)  # first step, m = 0: c = (1 - beta1) * g
    conflicting = (u * ref < 0) if criterion == "update" else (g * ref < 0)
    assert torch.equal(moved, ~conflicting)
    assert opt.frozen_counts == [int(conflicting.sum())]
    assert opt.state_bytes() == 400 * 4 + 25 * 4  # m + 2-bit codes: 4.25 B/param
