"""Steps inside backward (cpl_kernels.in_backward) on CPU: runs equal the same runs with a normal
step() bit for bit (parameters, optimizer state, codes, counts), for every optimizer class, with
per-step and per-epoch references; detaching, checkpoints, the memory held, activation
checkpointing. Refusals and errors: tests/test_in_backward_refusals.py."""
import copy
import io
import warnings

import pytest
import torch

from cpl_kernels import CPLAdamW, InBackward, MaskedAdamW, build_reference, in_backward, quant8
from cpl_kernels.optim._cpl import CODES_KEY
from in_backward_net import (INJECT, MASTERED, OPTIMIZERS, STEPS, assert_same, has_reference, loss_fn,
                             make_net, make_net_opt, masks_for, named, run_in_backward, run_normal, snapshot,
                             trainable)


CASES = [(name, ref) for name in OPTIMIZERS for ref in (["none"] if name == "masked" else
                                                          ["per-step", "per-epoch", "none"])]


@pytest.mark.parametrize("name,reference", CASES)
def test_in_backward_equals_step_bit_for_bit(name, reference, monkeypatch):
    monkeypatch.setattr(quant8, "MIN_NUMEL", 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in particular: no "lr_scheduler.step() before optimizer.step()"
        normal = run_normal(OPTIMIZERS[name], reference, scheduler=True)
        inside = run_in_backward(OPTIMIZERS[name], reference, scheduler=True)
    for a, b in zip(normal, inside):
        assert_same(a, b)
    if name == "adamw8bit":  # the 8-bit format did step (not only the fp32 fallback of small tensors)
        assert sum("exp_avg_codes" in st for st in normal[-1][1].values()) == 3
    if has_reference(make_net_opt(name)) and reference != "none":
        assert sum(sum(c[2][0]) for c in normal) > 0  # the reference did freeze elements


def test_in_backward_equals_step_on_every_kernel_backend(backend):
    """Per-parameter engine calls equal the list call on each backend (cpp; triton on CPU under
    the interpreter, bitwise as well: tests/tolerances.py)."""
    normal = run_normal(OPTIMIZERS["adamw-gradient"], "per-step")
    inside = run_in_backward(OPTIMIZERS["adamw-gradient"], "per-step")
    for a, b in zip(normal, inside):
        assert_same(a, b)


@pytest.mark.parametrize("reference", ["per-step", "per-epoch"])
def test_build_reference_while_attached_packs_through_the_hooks(reference):
    normal = run_normal(OPTIMIZERS["adamw-gradient"], reference)
    inside = run_in_backward(OPTIMIZERS["adamw-gradient"], reference, via_build_reference=True)
    for a, b in zip(normal, inside):
        assert_same(a, b)


def test_per_step_reference_frees_each_mastered_gradient_in_its_hook():
    model = make_net()
    opt = CPLAdamW(named(model), lr=0.05)
    attached = in_backward(opt)
    seen = []
    for p in trainable(model):  # registered after ours: sees the grad just after our hook freed it
        p.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad is None))
    with attached.reference_pass():
        loss_fn(model, MASTERED[0]).backward()
    assert seen == [True] * len(trainable(model))
    assert all(CODES_KEY in opt.state[p] for p in trainable(model))


def test_max_grad_norm_clips_each_parameter_as_clip_grad_norm_on_it():
    def normal():
        model = make_net()
        opt = CPLAdamW(named(model), lr=0.05)
        opt.clear_reference()
        for batch in INJECT:
            (10 * loss_fn(model, batch)).backward()
            for p in trainable(model):
                torch.nn.utils.clip_grad_norm_(p, 0.5)
            opt.step()
            opt.zero_grad()
        return snapshot(model, opt)

    model = make_net()
    opt = CPLAdamW(named(model), lr=0.05)
    opt.clear_reference()
    with in_backward(opt, max_grad_norm=0.5):
        for batch in INJECT:
            (10 * loss_fn(model, batch)).backward()
    assert_same(normal(), snapshot(model, opt))


# ---- detach, re-attach, checkpoints ----------------------------------------------------------------

def test_detach_and_reattach_continue_the_same_run():
    normal = run_normal(OPTIMIZERS["adamw-gradient"], "per-step")[-1]
    model = make_net()
    opt = OPTIMIZERS["adamw-gradient"](model)
    attached = None
    for t, batch in enumerate(INJECT):
        if t % 2 == 0:  # in backward on even steps, step() on odd ones
            attached = in_backward(opt)
            with attached.reference_pass():
                loss_fn(model, MASTERED[t % len(MASTERED)]).backward()
            loss_fn(model, batch).backward()
            attached.detach()
            assert not attached.attached
            attached.detach()  # idempotent
        else:
            build_reference(opt, model, [MASTERED[t % len(MASTERED)]], loss_fn)
            loss_fn(model, batch).backward()
            opt.step()
            opt.zero_grad()
    assert_same(normal, snapshot(model, opt))
    assert opt._cpl_in_backward is None and "_step_supports_amp_scaling" not in opt.__dict__


def test_context_manager_detaches():
    opt = CPLAdamW(trainable(make_net()))
    with in_backward(opt) as attached:
        assert isinstance(attached, InBackward) and attached.attached
    assert not attached.attached
    in_backward(opt).detach()  # attachable again


@pytest.mark.parametrize("name", ["adamw-gradient", "sgd-nesterov", "masked"])
def test_state_dict_round_trip_while_attached(name):
    """Save mid-run while attached, load into a fresh optimizer, continue in backward: equals the
    uninterrupted normal run."""
    reference = "none" if name == "masked" else "per-step"
    normal = run_normal(OPTIMIZERS[name], reference)[-1]
    model = make_net()
    opt = OPTIMIZERS[name](model)
    attached = in_backward(opt)
    if has_reference(opt):
        opt.clear_reference() if reference == "none" else None

    def train(steps, opt, attached):
        for t in steps:
            if reference == "per-step":
                with attached.reference_pass():
                    loss_fn(model, MASTERED[t % len(MASTERED)]).backward()
            loss_fn(model, INJECT[t]).backward()

    train(range(3), opt, attached)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    attached.detach()
    fresh = OPTIMIZERS[name](model) if name != "masked" else MaskedAdamW(named(model), masks=masks_for(model), lr=0.05)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    train(range(3, STEPS), fresh, in_backward(fresh))
    assert_same(normal, snapshot(model, fresh))


def test_load_state_dict_while_attached_keeps_stepping_the_loaded_groups():
    model = make_net()
    opt = CPLAdamW(named(model), lr=0.05)
    opt.clear_reference()
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["lr"] = 0.0
    with in_backward(opt):
        opt.load_state_dict(saved)
        before = [p.detach().clone() for p in trainable(model)]
        loss_fn(model, INJECT[0]).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, trainable(model)))  # lr 0: nothing moved
    assert all(p in opt.state for p in trainable(model))                     # but it stepped


def _live_bytes(fn):
    """(peak, net) CPU tensor bytes allocated while fn() runs, from the profiler's allocation
    records: what the allocator holds, not RSS."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live


@pytest.mark.parametrize("inside", [False, True])
def test_a_step_in_backward_holds_one_gradient_at_a_time_and_leaves_nothing_alive(inside):
    """The memory claim itself: a training step (per-step reference pass, forward, backward) in
    backward never holds two gradients at once and keeps no graph, gradient or temporary once it
    is over; the normal step holds all four gradients at its peak (the control: the bound can
    fail)."""
    torch.manual_seed(0)
    width, layers = 128, 4
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width, bias=False), torch.nn.Tanh())
                                  for _ in range(layers)])
    opt = CPLAdamW(model.parameters(), lr=1e-3)
    attached = in_backward(opt) if inside else None
    x, mastered = torch.randn(2, width), torch.randn(2, width)
    grad_bytes = width * width * 4
    held = []
    for p in model.parameters():  # registered after ours: sees what is left once our hook ran
        p.register_post_accumulate_grad_hook(
            lambda p: held.append(sum(q.grad is not None for q in model.parameters())))

    def train_step():
        build_reference(opt, model, [mastered], lambda m, b: m(b).square().mean())
        model(x).square().mean().backward()
        if not inside:
            opt.step()
            opt.zero_grad(set_to_none=True)

    train_step()  # warm-up: optimizer state allocated
    held.clear()
    peak, net = _live_bytes(train_step)
    activations = 2 * layers * 2 * width * 4 * 2  # inputs and tanh outputs of 2 rows, both backwards: generous
    if inside:
        assert held == [0] * (2 * layers)  # reference pass and step: each gradient gone in its hook
        assert peak < grad_bytes + activations + 4096
    else:
        assert peak >= layers * grad_bytes
    assert 0 <= net < 1024  # only the per-step count records (a few bytes per parameter)
    if attached is not None:
        attached.detach()


class Checkpointed(torch.nn.Module):
    """A middle layer recomputed in the backward (torch.utils.checkpoint); `share` also uses the
    first layer's weight inside the checkpointed segment."""

    def __init__(self, reentrant, share=False):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)
        self.reentrant, self.share = reentrant, share

    def segment(self, h):
        h = torch.tanh(self.b(h))
        return h @ self.a.weight if self.share else h

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.utils.checkpoint.checkpoint(self.segment, h, use_reentrant=self.reentrant)
        return self.c(h).square().mean()


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_layers_in_backward_equal_step_bit_for_bit(reentrant):
    """A reentrant checkpoint runs its segment's backward as a backward of its own (another graph
    task) inside the running one: its hooks belong to the same step and the same reference pass."""
    def run(inside):
        model = Checkpointed(reentrant)
        opt = CPLAdamW(named(model), lr=0.05, criterion="gradient")
        attached = in_backward(opt) if inside else None
        gen = torch.Generator().manual_seed(1)
        out = []
        for _ in range(4):
            x, mastered = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
            if inside:
                with attached.reference_pass():
                    model(mastered).backward()
                model(x).backward()
            else:
                build_reference(opt, model, [mastered], lambda m, b: m(b))
                model(x).backward()
                opt.step()
                opt.zero_grad()
            out.append(snapshot(model, opt))
        return out

    for a, b in zip(run(False), run(True)):
        assert_same(a, b)


def test_parameter_used_inside_and_outside_a_reentrant_checkpoint_raises_by_name():
    model = Checkpointed(reentrant=True, share=True)
    opt = CPLAdamW(named(model), lr=0.05)
    opt.clear_reference()
    with in_backward(opt):
        with pytest.raises(RuntimeError, match=r"'a.weight' got a second gradient .* use_reentrant=False"):
            model(torch.randn(4, 8)).backward()
        assert all(p.grad is None for p in model.parameters())
        model.share = False  # the next backward steps normally
        model(torch.randn(4, 8)).backward()
    assert opt.stepped_counts == [sum(p.numel() for p in model.parameters())]
