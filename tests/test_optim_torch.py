"""With no reference set, each CPL optimizer is its torch.optim counterpart: 50 steps side by side,
odd shapes, two param groups with different lr, an LR scheduler; checkpoints move both ways."""
import copy
import io

import pytest
import torch

from cpl_kernels import CPLAdam, CPLAdamW, CPLSGD

SHAPES = [(257,), (13, 31), (1,), (4, 4, 3), (0,)]
TOL = dict(rtol=1e-5, atol=1e-6)


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def groups_of(params, lrs=(0.03, 0.01)):
    return [{"params": params[:2], "lr": lrs[0]}, {"params": params[2:], "lr": lrs[1]}]


def set_grads(params, gen, t):
    for i, p in enumerate(params):
        p.grad = None if (i == 3 and t % 4 == 1) else torch.randn(p.shape, generator=gen)


def side_by_side(ours, theirs, p_ours, p_theirs, steps=50, sched=True, seed=1):
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.7) for o in (ours, theirs)] if sched else []
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for t in range(steps):
        set_grads(p_ours, g1, t)
        set_grads(p_theirs, g2, t)
        ours.step()
        theirs.step()
        for s in scheds:
            s.step()
        for i, (a, b) in enumerate(zip(p_ours, p_theirs)):
            torch.testing.assert_close(a.detach(), b.detach(), **TOL, msg=f"step {t} param {i}")
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]


CASES = [
    (CPLAdamW, torch.optim.AdamW, {}),  # defaults, weight_decay=1e-2 on both
    (CPLAdamW, torch.optim.AdamW, dict(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    (CPLAdam, torch.optim.Adam, {}),
    (CPLAdam, torch.optim.Adam, dict(weight_decay=0.05)),
    (CPLSGD, torch.optim.SGD, {}),
    (CPLSGD, torch.optim.SGD, dict(weight_decay=0.01)),
    (CPLSGD, torch.optim.SGD, dict(momentum=0.9, dampening=0.1)),
    (CPLSGD, torch.optim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
]
IDS = ["adamw", "adamw-hyper", "adam", "adam-l2", "sgd", "sgd-wd", "sgd-momentum", "sgd-nesterov"]


@pytest.mark.parametrize("ours_cls,torch_cls,kw", CASES, ids=IDS)
def test_matches_torch_optim_without_reference(ours_cls, torch_cls, kw):
    a, b = make_params(), make_params()
    side_by_side(ours_cls(groups_of(a), **kw), torch_cls(groups_of(b), **kw), a, b)


def test_defaults_match_torch():
    for ours, theirs in [(CPLAdamW, torch.optim.AdamW), (CPLAdam, torch.optim.Adam), (CPLSGD, torch.optim.SGD)]:
        p = [torch.nn.Parameter(torch.zeros(2))]
        mine, ref = ours(p).defaults, theirs(p).defaults
        for k in ("lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov"):
            if k in ref:
                assert mine[k] == ref[k], (ours.__name__, k)
        assert (mine["criterion"], mine["strict"]) == ("update", True)


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cls,kw", [(CPLAdamW, {}), (CPLAdam, dict(criterion="gradient", strict=False)),
                                    (CPLSGD, dict(momentum=0.9, criterion="gradient"))], ids=["adamw", "adam", "sgd"])
def test_state_dict_round_trip_resumes_bit_exactly(cls, kw):
    params = make_params()
    opt = cls(groups_of(params), **kw)
    gen = torch.Generator().manual_seed(5)
    for t in range(10):
        if t == 3:
            set_grads(params, gen, 0)
            params[1].grad = None  # this one gets no reference
            opt.set_reference_from_grads()
        set_grads(params, gen, t)
        opt.step()
    sd = roundtrip(opt.state_dict())
    assert set(sd["state"][0]) <= {"step", "exp_avg", "exp_avg_sq", "momentum_buffer"}  # torch's keys only
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = cls(groups_of(clone, lrs=(9.0, 9.0)), **{**kw, "criterion": "update"})
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.03 and opt2.param_groups[0]["criterion"] == opt.param_groups[0]["criterion"]
    assert opt2.has_reference
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for t in range(10):
        set_grads(params, g1, t)
        set_grads(clone, g2, t)
        opt.step()
        opt2.step()
        assert opt.frozen_counts == opt2.frozen_counts
        for a, b in zip(params, clone):
            assert torch.equal(a, b), f"step {t}"
    assert sum(opt.frozen_counts) > 0


@pytest.mark.parametrize("ours_cls,torch_cls,kw", [(CPLAdamW, torch.optim.AdamW, {}), (CPLAdam, torch.optim.Adam, {}),
                                                   (CPLSGD, torch.optim.SGD, dict(momentum=0.9))], ids=["adamw", "adam", "sgd"])
def test_checkpoints_move_between_torch_and_cpl(ours_cls, torch_cls, kw):
    gen = torch.Generator().manual_seed(2)
    a = make_params()
    theirs = torch_cls(groups_of(a), **kw)
    for t in range(5):
        set_grads(a, gen, t)
        theirs.step()
    # torch -> CPL: continue both, identical within fp32 tolerance
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = ours_cls(groups_of(b), **kw)
    ours.load_state_dict(roundtrip(theirs.state_dict()))
    assert not ours.has_reference
    side_by_side(ours, theirs, b, a, steps=10, sched=False, seed=3)
    # CPL (with a reference: its codes travel under a key torch ignores) -> torch
    set_grads(b, gen, 0)
    ours.set_reference_from_grads()
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    theirs2 = torch_cls(groups_of(c), **kw)
    theirs2.load_state_dict(roundtrip(ours.state_dict()))
    ours.clear_reference()  # the torch optimizer has no CPL rule: compare the plain paths
    side_by_side(ours, theirs2, b, c, steps=10, sched=False, seed=4)
    # and back again: torch's re-export must load cleanly (without codes)
    ours.load_state_dict(copy.deepcopy(theirs2.state_dict()))
    assert not ours.has_reference


def test_bf16_params_keep_fp32_state_through_torch_checkpoints():
    p = torch.nn.Parameter(torch.randn(40).bfloat16())
    theirs = torch.optim.AdamW([p])
    p.grad = torch.randn(40).bfloat16()
    theirs.step()
    ours = CPLAdamW([p])
    ours.load_state_dict(theirs.state_dict())
    assert ours.state[p]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(ours.state[p]["exp_avg"], theirs.state[p]["exp_avg"].float())
    ours.step()
    assert float(ours.state[p]["step"]) == 2.0


def test_closure_and_zero_grad_like_torch():
    a, b = make_params(), make_params()
    ours, theirs = CPLAdamW(a, lr=0.1), torch.optim.AdamW(b, lr=0.1)
    for opt, params in ((ours, a), (theirs, b)):
        def closure(params=params, opt=opt):
            opt.zero_grad()
            loss = sum((p * p).sum() for p in params)
            loss.backward()
            return loss
        assert float(opt.step(closure).detach()) > 0
        opt.zero_grad()
        assert all(p.grad is None for p in params)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), **TOL)
