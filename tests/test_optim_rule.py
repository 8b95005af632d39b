"""CPL optimizers against the rule of docs/design.md section 1, written here in plain PyTorch (not via
cpl_kernels.reference), for 50 steps with a reference refreshed mid-run."""
import pytest
import torch

from cpl_kernels import CPLAdam, CPLAdamW, CPLSGD

SHAPES = [(257,), (13, 31), (1,), (4, 4, 3), (33,)]
STEPS = 50
TOL = dict(rtol=1e-5, atol=1e-6)


def conflicting(x, r):
    return (x * torch.sign(r)) < 0  # sign(r): the product never underflows to a false tie


class RuleAdam:
    def __init__(self, p, decoupled, lr, betas, eps, wd, criterion, strict):
        self.p, self.m, self.v, self.t = p.clone(), torch.zeros_like(p), torch.zeros_like(p), 0
        self.decoupled, self.lr, (self.b1, self.b2), self.eps, self.wd = decoupled, lr, betas, eps, wd
        self.criterion, self.strict = criterion, strict

    def step(self, g, r):
        self.t += 1
        p, t = self.p, self.t
        if not self.decoupled:
            g = g + self.wd * p
        bad = torch.zeros_like(p, dtype=torch.bool)
        if r is not None and self.criterion == "gradient":
            bad = conflicting(g, r)
            g = torch.where(bad, 0.0, g)
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        u = (self.m / (1 - self.b1 ** t)) / ((self.v / (1 - self.b2 ** t)).sqrt() + self.eps)
        if self.decoupled:
            u = u + self.wd * p
        if r is not None and self.criterion == "update":
            bad = conflicting(u, r)
        keep = bad if (self.criterion == "update" or self.strict) else torch.zeros_like(bad)
        self.p = torch.where(keep, p, p - self.lr * u)
        return int(bad.sum())


class RuleSGD:
    def __init__(self, p, lr, momentum, dampening, wd, nesterov, criterion, strict):
        self.p, self.buf = p.clone(), None
        self.lr, self.mu, self.damp, self.wd, self.nesterov = lr, momentum, dampening, wd, nesterov
        self.criterion, self.strict = criterion, strict

    def step(self, g, r):
        p = self.p
        g = g + self.wd * p
        bad = torch.zeros_like(p, dtype=torch.bool)
        if r is not None and self.criterion == "gradient":
            bad = conflicting(g, r)
            g = torch.where(bad, 0.0, g)
        u = g
        if self.mu:
            self.buf = g.clone() if self.buf is None else self.mu * self.buf + (1 - self.damp) * g
            u = g + self.mu * self.buf if self.nesterov else self.buf
        if r is not None and self.criterion == "update":
            bad = conflicting(u, r)
        keep = bad if (self.criterion == "update" or self.strict) else torch.zeros_like(bad)
        self.p = torch.where(keep, p, p - self.lr * u)
        return int(bad.sum())


def make_reference(gen):
    refs = []
    for i, s in enumerate(SHAPES):
        r = torch.randn(s, generator=gen)
        r.view(-1)[::5] = 0.0  # elements the mastered loss never touches: always collaborative
        refs.append(None if i == 2 else r)  # one parameter without a reference gradient
    return refs


def run(make_opt, make_rules, lrs=(0.05, 0.02)):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    params = [torch.nn.Parameter(x.clone()) for x in init]
    groups = [{"params": params[:3], "lr": lrs[0]}, {"params": params[3:], "lr": lrs[1]}]
    opt = make_opt(groups)
    rules = [make_rules(x, lrs[0] if i < 3 else lrs[1]) for i, x in enumerate(init)]
    refs = None
    total_frozen = 0
    for t in range(STEPS):
        if t in (0, 25):  # the reference is refreshed mid-run
            refs = make_reference(gen)
            for p, r in zip(params, refs):
                p.grad = None if r is None else r.clone()
            opt.set_reference_from_grads()
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (i == 4 and t % 3 == 0) else g.clone()  # sometimes no gradient: skipped
        opt.step()
        expected = [0, 0]
        for i, (rule, g, r) in enumerate(zip(rules, grads, refs)):
            if params[i].grad is not None:
                expected[0 if i < 3 else 1] += rule.step(g, r)
        assert opt.frozen_counts == expected, f"step {t}"
        total_frozen += sum(expected)
        for i, (p, rule) in enumerate(zip(params, rules)):
            torch.testing.assert_close(p.detach(), rule.p, **TOL, msg=f"step {t} param {i}")
    assert total_frozen > 0.2 * STEPS * sum(x.numel() for x in init)  # the rule did freeze a lot


CRITERIA = [("update", True), ("gradient", True), ("gradient", False)]


@pytest.mark.parametrize("criterion,strict", CRITERIA)
@pytest.mark.parametrize("cls,decoupled,wd", [(CPLAdamW, True, 0.1), (CPLAdam, False, 0.05), (CPLAdam, False, 0.0)])
def test_adam_family_follows_the_rule(cls, decoupled, wd, criterion, strict):
    betas, eps = (0.9, 0.99), 1e-6
    run(lambda groups: cls(groups, betas=betas, eps=eps, weight_decay=wd, criterion=criterion, strict=strict),
        lambda x, lr: RuleAdam(x, decoupled, lr, betas, eps, wd, criterion, strict))


@pytest.mark.parametrize("criterion,strict", CRITERIA)
@pytest.mark.parametrize("momentum,dampening,nesterov,wd", [(0.0, 0.0, False, 0.0), (0.9, 0.1, False, 0.01),
                                                            (0.8, 0.0, True, 0.0)], ids=["plain", "momentum", "nesterov"])
def test_sgd_follows_the_rule(momentum, dampening, nesterov, wd, criterion, strict):
    run(lambda groups: CPLSGD(groups, momentum=momentum, dampening=dampening, nesterov=nesterov,
                              weight_decay=wd, criterion=criterion, strict=strict),
        lambda x, lr: RuleSGD(x, lr, momentum, dampening, wd, nesterov, criterion, strict))


def test_frozen_fraction_is_lazy_and_consistent():
    p = torch.nn.Parameter(torch.randn(1000))
    opt = CPLAdamW([p], lr=0.1)
    assert opt.frozen_fraction == 0.0 and not opt.has_reference
    p.grad = torch.randn(1000)
    opt.set_reference_from_grads()
    assert opt.has_reference
    p.grad = torch.randn(1000)
    opt.step()
    assert all(isinstance(c, torch.Tensor) for counts in opt._frozen for c in counts)  # no .item() in step
    assert opt.stepped_counts == [1000]
    assert opt.frozen_fraction == opt.frozen_counts[0] / 1000
    assert 0.3 < opt.frozen_fraction < 0.7  # independent signs: about half conflict
    opt.clear_reference()
    assert not opt.has_reference
    opt.step()
    assert opt.frozen_counts == [0]
