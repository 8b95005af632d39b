"""Steps inside backward (cpl_kernels.in_backward) on CPU: runs equal the same runs with a normal
step() bit for bit (parameters, optimizer state, codes, counts), for every optimizer class, with
per-step and per-epoch references; what cannot work is refused; errors leave what the docs say."""
import copy
import io
import warnings

import pytest
import torch

from cpl_kernels import (CPLAdam, CPLAdamW, CPLLion, CPLSGD, InBackward, MaskedAdamW, build_reference,
                         in_backward, quant8)
from cpl_kernels.optim import CPLAdamW8bit
from cpl_kernels.optim._cpl import CODES_KEY

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


def make_net_opt(name):
    return OPTIMIZERS[name](make_net())


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


# ---- refusals ----------------------------------------------------------------------------------------

def test_step_while_attached_raises_saying_why():
    model = make_net()
    opt = CPLAdamW(named(model))
    with in_backward(opt):
        with pytest.raises(RuntimeError, match="steps inside backward.*detach"):
            opt.step()


def test_attach_refuses_held_gradients_other_optimizers_and_double_attach():
    model = make_net()
    opt = CPLAdamW(named(model))
    loss_fn(model, INJECT[0]).backward()
    with pytest.raises(RuntimeError, match="already hold a gradient"):
        in_backward(opt)
    assert opt._cpl_in_backward is None
    opt.zero_grad()
    with pytest.raises(TypeError, match="cpl_kernels optimizer"):
        in_backward(torch.optim.AdamW(trainable(model)))
    with in_backward(opt):
        with pytest.raises(RuntimeError, match="already attached"):
            in_backward(opt)
    with pytest.raises(ValueError, match="max_grad_norm"):
        in_backward(opt, max_grad_norm=0)


def test_gradient_present_when_a_backward_starts_raises_before_any_step():
    """Gradient accumulation: a gradient left on a parameter (here put there by hand) would be
    stepped with the next backward's; the backward raises at its first hook, nothing stepped."""
    model = make_net()
    opt = CPLAdamW(named(model), lr=0.05)
    opt.clear_reference()
    with in_backward(opt):
        model.inp.weight.grad = torch.zeros_like(model.inp.weight)  # a parameter reached last
        before = snapshot(model, opt)
        with pytest.raises(RuntimeError, match="'inp.weight' already holds a gradient"):
            loss_fn(model, INJECT[0]).backward()
        assert_same(before, snapshot(model, opt))
        assert all(p.grad is None for p in model.parameters())  # freed: the next backward runs
        loss_fn(model, INJECT[0]).backward()
        assert not torch.equal(before[0][0], model.inp.weight)


def test_gradient_on_the_first_parameter_reached_raises_in_its_pre_hook():
    model = make_net()
    opt = CPLAdamW(named(model), lr=0.05)
    opt.clear_reference()
    with in_backward(opt):
        model.scale.grad = torch.zeros_like(model.scale)  # scale's gradient is complete first
        before = snapshot(model, opt)
        with pytest.raises(RuntimeError, match="already holds a gradient"):
            loss_fn(model, INJECT[0]).backward()
        assert_same(before, snapshot(model, opt))


def test_grad_scaler_step_raises_and_leaves_no_scale_behind():
    for make in (OPTIMIZERS["adamw-gradient"], OPTIMIZERS["masked"]):
        model = make_net()
        opt = make(model)
        if has_reference(opt):
            opt.clear_reference()
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        with in_backward(opt):
            scaler.scale(loss_fn(model, INJECT[0])).backward()
            with pytest.raises(RuntimeError, match="GradScaler"):
                scaler.step(opt)
        assert getattr(opt, "grad_scale", None) is None and getattr(opt, "found_inf", None) is None


def test_ddp_like_setup_is_refused(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    opt = CPLAdamW(trainable(make_net()))
    with pytest.raises(NotImplementedError, match="DDP"):
        in_backward(opt)
    assert opt._cpl_in_backward is None


def test_param_group_added_after_attaching_is_refused():
    model = make_net()
    opt = CPLAdamW([model.inp.weight, model.inp.bias, model.tied, model.out_t])  # not scale
    opt.clear_reference()
    with in_backward(opt):
        opt.add_param_group({"params": [model.scale]})
        with pytest.raises(RuntimeError, match="add_param_group"):
            loss_fn(model, INJECT[0]).backward()


# ---- reference passes ------------------------------------------------------------------------------

def test_second_backward_in_one_reference_pass_raises_before_packing():
    """The second backward raises at its first hook: the codes are those its first backward packed
    (set_reference_from_grads on MASTERED[1] gives the same), and stepping is refused until a
    reference is set again (the pass did not complete)."""
    model = make_net()
    opt = CPLAdamW(named(model), lr=0.05)
    attached = in_backward(opt)
    with pytest.raises(RuntimeError, match="second backward.*accumulate=True"):
        with attached.reference_pass():
            loss_fn(model, MASTERED[1]).backward()
            loss_fn(model, MASTERED[2]).backward()
    assert all(p.grad is None for p in model.parameters())
    model2 = make_net()
    opt2 = CPLAdamW(named(model2), lr=0.05)
    loss_fn(model2, MASTERED[1]).backward()
    opt2.set_reference_from_grads()
    for p, q in zip(trainable(model), trainable(model2)):
        assert torch.equal(opt.state[p][CODES_KEY], opt2.state[q][CODES_KEY])
    with pytest.raises(RuntimeError, match="reference pass failed"):
        loss_fn(model, INJECT[0]).backward()
    opt.set_reference_from_grads({p: q.grad for p, q in zip(trainable(model), trainable(model2))})
    loss_fn(model, INJECT[0]).backward()  # a reference set by hand: steps again
    attached.detach()


def test_failed_accumulating_reference_pass_packs_nothing():
    model = make_net()
    opt = CPLAdamW(named(model), lr=0.05)
    attached = in_backward(opt)
    with attached.reference_pass():
        loss_fn(model, MASTERED[0]).backward()
    codes = [opt.state[p][CODES_KEY].clone() for p in trainable(model)]
    with pytest.raises(KeyError):
        with attached.reference_pass(accumulate=True):
            loss_fn(model, MASTERED[1]).backward()
            raise KeyError("a data loader error")
    assert all(torch.equal(c, opt.state[p][CODES_KEY]) for c, p in zip(codes, trainable(model)))
    assert all(p.grad is None for p in model.parameters())
    loss_fn(model, INJECT[0]).backward()  # steps on the previous reference


def test_reference_pass_interrupted_mid_backward_refuses_to_step_until_a_new_reference():
    model = make_net()
    opt = CPLAdamW(named(model), lr=0.05)
    attached = in_backward(opt)
    with attached.reference_pass():
        loss_fn(model, MASTERED[0]).backward()

    def boom(p):
        raise ValueError("boom")
    handle = model.inp.weight.register_post_accumulate_grad_hook(boom)  # after ours: inp.weight packed
    with pytest.raises(ValueError, match="boom"):
        with attached.reference_pass():
            loss_fn(model, MASTERED[1]).backward()
    handle.remove()
    assert all(p.grad is None for p in model.parameters())
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="reference pass failed after packing .* run a reference pass again"):
        loss_fn(model, INJECT[0]).backward()
    assert_same(before, snapshot(model, opt))
    with attached.reference_pass():
        loss_fn(model, MASTERED[1]).backward()
    loss_fn(model, INJECT[0]).backward()  # steps again
    assert not torch.equal(before[0][0], model.inp.weight)
    attached.detach()


def test_parameters_without_a_mastered_gradient_get_no_reference():
    model = make_net()
    opt = CPLAdamW(named(model), lr=0.05)
    with in_backward(opt) as attached:
        with attached.reference_pass():
            loss_fn(model, MASTERED[0]).backward()
        assert CODES_KEY in opt.state[model.tied]
        with attached.reference_pass():
            (model.inp(MASTERED[0][0]) ** 2).mean().backward()  # reaches inp only
    assert CODES_KEY in opt.state[model.inp.weight]
    assert CODES_KEY not in opt.state[model.tied]


def test_reference_pass_needs_a_cpl_optimizer():
    model = make_net()
    with in_backward(OPTIMIZERS["masked"](model)) as attached:
        with pytest.raises(TypeError, match="no reference"):
            with attached.reference_pass():
                pass


# ---- non-finite gradients and errors mid-backward ------------------------------------------------

def nan_at(model, name):
    """A forward hook-free way to make one parameter's gradient NaN: a NaN-producing tensor hook."""
    p = dict(model.named_parameters())[name]
    return p.register_hook(lambda g: torch.full_like(g, float("nan")))


def test_nonfinite_raise_mid_backward_leaves_earlier_parameters_stepped():
    """check_finite="raise": the failing parameter is named and not written; parameters whose
    hooks ran earlier in that backward stay stepped, later ones are not; every gradient is freed
    and the next backward steps normally."""
    model = make_net()
    opt = CPLAdamW(named(model), lr=0.05, check_finite="raise")
    opt.clear_reference()
    order = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p, name=name: order.append(name))
    with in_backward(opt):
        loss_fn(model, INJECT[0]).backward()  # one good step, to learn the hook order
        hook_order = list(order)
        failing = hook_order[2]
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        state_before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()
                        if p in opt.state}
        handle = nan_at(model, failing)
        with pytest.raises(FloatingPointError, match=failing):
            loss_fn(model, INJECT[1]).backward()
        handle.remove()
        params = dict(model.named_parameters())
        for n in hook_order[:2]:
            assert not torch.equal(before[n], params[n]), n           # stepped before the failure
        for n in hook_order[2:]:
            assert torch.equal(before[n], params[n]), n                # the failing one and later
            for k, v in state_before[n].items():
                assert torch.equal(v, opt.state[params[n]][k]), (n, k)
        assert all(p.grad is None for p in model.parameters())
        loss_fn(model, INJECT[1]).backward()
        assert not torch.equal(before[hook_order[-1]], params[hook_order[-1]])


def test_nonfinite_skip_warns_by_name_and_counts_as_step_does():
    def run(attached):
        model = make_net()
        opt = CPLAdamW(named(model), lr=0.05)
        opt.clear_reference()
        handle = nan_at(model, "tied")
        with pytest.warns(RuntimeWarning, match="'tied' \\(256\\)"):
            if attached:
                with in_backward(opt):
                    loss_fn(model, INJECT[0]).backward()
            else:
                loss_fn(model, INJECT[0]).backward()
                opt.step()
                opt.zero_grad()
        handle.remove()
        return snapshot(model, opt)

    normal, inside = run(False), run(True)
    assert_same(normal, inside)
    assert sum(normal[2][2]) == 16 * 16


def test_masked_adamw_nonfinite_raise_names_the_parameter():
    model = make_net()
    opt = MaskedAdamW(named(model), masks=masks_for(model), lr=0.05, check_finite="raise")  # default: "skip"
    handle = nan_at(model, "tied")
    with in_backward(opt):
        with pytest.raises(FloatingPointError, match="'tied' holds NaN or inf"):
            loss_fn(model, INJECT[0]).backward()
    handle.remove()
    assert all(p.grad is None for p in model.parameters())


def test_a_backward_that_fails_outside_the_hooks_keeps_what_it_stepped():
    """An error elsewhere in backward (here a hook on an activation) stops it after some
    parameters stepped; the next backward is a step of its own (all parameters, fresh counts)."""
    model = make_net()
    opt = CPLAdamW(named(model), lr=0.05)
    opt.clear_reference()
    numel = sum(p.numel() for p in trainable(model))
    with in_backward(opt):
        before = {n: p.detach().clone() for n, p in named(model)}
        x, y = INJECT[0]
        h = torch.tanh(model.inp(x))
        h = torch.tanh(h @ model.tied)
        h.register_hook(lambda g: (_ for _ in ()).throw(ValueError("elsewhere")))
        h = torch.tanh(h @ model.tied.t())
        out = (h @ model.out_t.t()) * model.scale.float()
        with pytest.raises(ValueError, match="elsewhere"):
            ((out - y) ** 2).mean().backward()
        params = dict(named(model))
        assert not torch.equal(before["out_t"], params["out_t"])   # reached before the error
        assert torch.equal(before["inp.weight"], params["inp.weight"])  # not reached
        assert all(p.grad is None for p in model.parameters())
        loss_fn(model, INJECT[1]).backward()
        assert opt.stepped_counts == [numel]


def test_parameters_that_do_not_require_grad_are_not_hooked():
    model = make_net()
    opt = CPLAdamW([p for p in model.parameters()], lr=0.05)  # includes the frozen one
    opt.clear_reference()
    with in_backward(opt):
        loss_fn(model, INJECT[0]).backward()
        model.frozen.requires_grad_(True)  # now it gets a gradient, which no hook would step
        with pytest.raises(RuntimeError, match="no hook: it did not require grad"):
            loss_fn(model, INJECT[0]).backward()


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
