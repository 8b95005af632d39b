"""Steps inside backward (cpl_kernels.in_backward): what cannot work is refused, saying why, and
errors (a failed reference pass, non-finite gradients, a backward failing mid-way) leave what
docs/optimizers.md says."""
import pytest
import torch

from cpl_kernels import CPLAdamW, MaskedAdamW, in_backward
from cpl_kernels.optim._cpl import CODES_KEY
from in_backward_net import (INJECT, MASTERED, OPTIMIZERS, assert_same, has_reference, loss_fn, make_net,
                             masks_for, named, snapshot, trainable)


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
