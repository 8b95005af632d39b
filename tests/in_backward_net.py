"""The test net, optimizers and training loops shared by tests/test_in_backward*.py: a run with
steps inside backward (cpl_kernels.in_backward) against the same run with a normal step()."""
import torch

from cpl_kernels import (CPLAdam, CPLAdamW, CPLLion, CPLSGD, MaskedAdamW, build_reference,
                         in_backward)
from cpl_kernels.optim import CPLAdamW8bit

STEPS = 6


class Net(torch.nn.Module):
    """A Linear pair with a tied weight (used twice: its hook must fire once, on the sum), a
    transposed (non-contiguous, dense) parameter, a bf16 parameter and a frozen one."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(8, 16)
        self.tied = torch.nn.Parameter(torch.randn(16, 16) * 0.3)
        self.out_t = torch.nn.Parameter((torch.randn(16, 4) * 0.3).t())   # (4, 16), stride (1, 4)
        self.scale = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        self.frozen = torch.nn.Parameter(torch.zeros(4), requires_grad=False)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(h @ self.tied)
        h = torch.tanh(h @ self.tied.t())
        return (h @ self.out_t.t()) * self.scale.float() + self.frozen


def make_net():
    torch.manual_seed(0)
    return Net()


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def batches(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 8, generator=gen), torch.randn(6, 4, generator=gen)) for _ in range(n)]


INJECT, MASTERED = batches(STEPS, 1), batches(4, 2)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def named(model):
    """Named parameters, so that errors name them."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def masks_for(model):
    gen = torch.Generator().manual_seed(3)
    return [torch.rand(p.shape, generator=gen) < 0.5 for p in trainable(model)]


OPTIMIZERS = {
    "adamw-update": lambda m: CPLAdamW(named(m), lr=0.05, criterion="update"),
    "adamw-gradient": lambda m: CPLAdamW(named(m), lr=0.05, criterion="gradient"),
    "adamw-gradient-loose": lambda m: CPLAdamW(named(m), lr=0.05, criterion="gradient", strict=False),
    "adam": lambda m: CPLAdam(named(m), lr=0.05, weight_decay=0.1),
    "sgd-nesterov": lambda m: CPLSGD(named(m), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd-plain": lambda m: CPLSGD(named(m), lr=0.05),
    "lion": lambda m: CPLLion(named(m), lr=0.01, weight_decay=0.1),
    "masked": lambda m: MaskedAdamW(named(m), masks=masks_for(m), lr=0.05),
    # 8-bit state for tensors of >= 64 elements here (the test lowers quant8.MIN_NUMEL): the Net's
    # weights (one partial block each) step in 8 bits, its bias and scale in fp32.
    "adamw8bit": lambda m: CPLAdamW8bit(named(m), lr=0.05, weight_decay=0.1),
    "two-groups": lambda m: CPLAdamW([{"params": [m.inp.weight, m.inp.bias], "lr": 0.02},
                                      {"params": [m.tied, m.out_t, m.scale]}], lr=0.05),
}


def has_reference(opt):
    return hasattr(opt, "set_reference_from_grads")


def snapshot(model, opt):
    """Everything a step writes, cloned."""
    state = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for i, p in enumerate(trainable(model)) if p in opt.state}
    counts = (opt.frozen_counts, opt.stepped_counts, opt.nonfinite_counts) if has_reference(opt) else None
    return [p.detach().clone() for p in model.parameters()], state, counts


def assert_same(a, b):
    (pa, sa, ca), (pb, sb, cb) = a, b
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb):
        assert torch.equal(x, y), (x - y).abs().max()
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert ca == cb


def train_loop(make_opt, reference, scheduler=False, bwd=False, via_build_reference=False):
    """The training loop both ways: normal steps (`opt.step()`), or steps inside backward with the
    references packed by the hooks (or by build_reference, when via_build_reference)."""
    model = make_net()
    opt = make_opt(model)
    attached = in_backward(opt) if bwd else None
    hooks_pack = bwd and not via_build_reference
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    if has_reference(opt) and reference == "none":
        opt.clear_reference()
    out = []
    for t, batch in enumerate(INJECT):
        if has_reference(opt) and reference == "per-step":
            if hooks_pack:
                with attached.reference_pass():
                    loss_fn(model, MASTERED[t % len(MASTERED)]).backward()
            else:
                build_reference(opt, model, [MASTERED[t % len(MASTERED)]], loss_fn)
        if has_reference(opt) and reference == "per-epoch" and t % 3 == 0:
            if hooks_pack:
                with attached.reference_pass(accumulate=True):
                    for b in MASTERED:
                        (loss_fn(model, b) / len(MASTERED)).backward()
            else:
                build_reference(opt, model, MASTERED, loss_fn)
        loss_fn(model, batch).backward()
        if bwd:
            assert all(p.grad is None for p in model.parameters())
        else:
            opt.step()
            opt.zero_grad()
        if sched:
            sched.step()
        out.append(snapshot(model, opt))
    if bwd:
        attached.detach()
    return out


def run_normal(make_opt, reference, scheduler=False):
    return train_loop(make_opt, reference, scheduler)


def run_in_backward(make_opt, reference, scheduler=False, via_build_reference=False):
    return train_loop(make_opt, reference, scheduler, bwd=True, via_build_reference=via_build_reference)


def make_net_opt(name):
    return OPTIMIZERS[name](make_net())
