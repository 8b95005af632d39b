"""build_reference: the sign of the mean mastered gradient, both schedules, grads put back; clear
errors that change nothing."""
import contextlib
import copy
import sys

import pytest
import torch

from cpl_kernels import CPLAdamW, build_reference
from cpl_kernels import reference as ref


def setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Flatten(), torch.nn.Linear(24, 5))
    batches = [(torch.randint(0, 10, (4, 3)), torch.randint(0, 5, (4,))) for _ in range(3)]  # tokens >= 10 unseen
    return model, batches


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def expected_signs(model, batches):
    total = [torch.zeros_like(p) for p in model.parameters()]
    for b in batches:
        grads = torch.autograd.grad(loss_fn(model, b), list(model.parameters()))
        total = [t + g / len(batches) for t, g in zip(total, grads)]
    return [torch.sign(t).reshape(-1) for t in total]


def codes_signs(opt, p):
    return ref.unpack_signs(opt.state[p]["cpl_codes"], p.numel())


def test_full_pass_reference_is_the_sign_of_the_mean_gradient():
    model, batches = setup()
    opt = CPLAdamW(model.parameters())
    used = build_reference(opt, model, batches, loss_fn, progress=False)
    assert used == 3
    for p, s in zip(model.parameters(), expected_signs(model, batches)):
        assert torch.equal(codes_signs(opt, p), s)
        assert p.grad is None  # the mastered gradients are freed
    emb = codes_signs(opt, model[0].weight).view(20, 8)
    assert (emb[10:] == 0).all() and (emb[:10] != 0).any()  # unseen rows: zero, always collaborative


def test_per_step_sampled_batch_and_generator_input():
    model, batches = setup()
    opt = CPLAdamW(model.parameters())
    build_reference(opt, model, [batches[1]], loss_fn, progress=True)
    for p, s in zip(model.parameters(), expected_signs(model, [batches[1]])):
        assert torch.equal(codes_signs(opt, p), s)
    assert build_reference(opt, model, (b for b in batches), loss_fn, progress=False) == 3  # unsized
    for p, s in zip(model.parameters(), expected_signs(model, batches)):
        assert torch.equal(codes_signs(opt, p), s)


def test_existing_gradients_are_put_back_and_step_uses_them():
    model, batches = setup()
    opt = CPLAdamW(model.parameters(), lr=0.1)
    loss_fn(model, batches[0]).backward()
    injection = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    build_reference(opt, model, batches[1:], loss_fn, progress=False)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), injection))
    opt.step()
    assert 0 < opt.frozen_fraction < 1
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ---- argument checks: say what was expected, print no tensor, change nothing ------------------------

def snapshot(opt, model):
    """The optimizer's codes and the parameters' .grad objects (and values) at this moment."""
    codes = {p: opt.state[p]["cpl_codes"].clone() for p in model.parameters() if "cpl_codes" in opt.state[p]}
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    return codes, grads


def assert_unchanged(opt, model, before):
    codes, grads = before
    assert {p for p in model.parameters() if "cpl_codes" in opt.state[p]} == set(codes)
    assert all(torch.equal(opt.state[p]["cpl_codes"], c) for p, c in codes.items())
    assert all(p.grad is g and torch.equal(p.grad, v) for p, (g, v) in zip(model.parameters(), grads))


def none_after_first_batch():
    """A loss_fn failing on the second batch, after the first one's backward wrote gradients."""
    calls = []

    def loss(model, batch):
        calls.append(batch)
        return loss_fn(model, batch) if len(calls) == 1 else None
    return loss


BAD_CALLS = {
    "dict": (lambda b: ({"input_ids": b[0][0]}, loss_fn), TypeError, r"got a dict: did you mean \[batch\]\?"),
    "tensor": (lambda b: (b[0][0], loss_fn), TypeError, r"got a Tensor int64\[4, 3\]: did you mean \[batch\]\?"),
    "tuple batch": (lambda b: (b[0], loss_fn), TypeError, r"tuple of 2 tensors .*looks like one batch"),
    "not iterable": (lambda b: (None, loss_fn), TypeError, "must be an iterable of batches"),
    "empty": (lambda b: ([], loss_fn), ValueError, "yielded no batch"),
    "no labels": (lambda b: (b, lambda model, batch: None), TypeError,
                  r"loss_fn returned None: does the batch carry labels\?"),
    "none later": (lambda b: (b[:2], none_after_first_batch()), TypeError, r"returned None.*mastered batch 1"),
    "per-example loss": (lambda b: (b, lambda model, batch: torch.nn.functional.cross_entropy(
        model(batch[0]), batch[1], reduction="none")), ValueError, r"scalar loss, got a tensor of shape \(4,\)"),
    "float loss": (lambda b: (b, lambda model, batch: 1.0), TypeError, "scalar tensor, got float"),
    "no grad": (lambda b: (b, lambda model, batch: loss_fn(model, batch).detach()), RuntimeError,
                "does not require grad"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_clearly_and_change_nothing(case):
    model, batches = setup()
    opt = CPLAdamW(model.parameters())
    build_reference(opt, model, batches[:1], loss_fn)
    loss_fn(model, batches[2]).backward()  # an injection gradient build_reference must put back
    before = snapshot(opt, model)
    make, error, message = BAD_CALLS[case]
    mastered, bad_loss = make(batches)
    with pytest.raises(error, match=message) as info:
        build_reference(opt, model, mastered, bad_loss)
    assert "tensor(" not in str(info.value) and len(str(info.value)) < 400  # no value dumps
    assert_unchanged(opt, model, before)


@pytest.mark.parametrize("which", ["a copy of the model", "part of the model"])
def test_optimizer_must_hold_the_models_parameters(which):
    model, batches = setup()
    if which == "a copy of the model":
        opt, lacks = CPLAdamW(copy.deepcopy(model).parameters()), "lacks 3 of the model's 3 trainable"
    else:
        opt, lacks = CPLAdamW(model[2].parameters()), r"lacks 1 of the model's 3 trainable parameters \('0.weight'\)"
    loss_fn(model, batches[0]).backward()
    before = snapshot(opt, model)
    with pytest.raises(ValueError, match=lacks):
        build_reference(opt, model, batches, loss_fn)
    assert_unchanged(opt, model, before)
    assert not opt.has_reference
    with pytest.raises(TypeError, match="needs a CPL optimizer"):
        build_reference(torch.optim.AdamW(model.parameters()), model, batches, loss_fn)


def test_errors_from_loss_fn_name_the_batch_without_values():
    model, batches = setup()
    opt = CPLAdamW(model.parameters())

    def needs_dicts(model, batch):
        return model(batch["input_ids"]).sum()

    with pytest.raises(TypeError) as info:
        build_reference(opt, model, batches, needs_dicts)
    notes = getattr(info.value, "__notes__", [])
    if sys.version_info >= (3, 11):
        assert notes == ["build_reference: raised on mastered batch 0: tuple (int64[4, 3], int64[4])"]
    assert all(p.grad is None for p in model.parameters()) and not opt.has_reference


def test_progress_bar_is_off_by_default(monkeypatch):
    import tqdm.auto
    bars = []

    def fake_tqdm(iterable, **kwargs):
        bars.append(kwargs)
        return contextlib.nullcontext(iterable)

    monkeypatch.setattr(tqdm.auto, "tqdm", fake_tqdm)
    model, batches = setup()
    opt = CPLAdamW(model.parameters())
    build_reference(opt, model, batches, loss_fn)
    assert bars == []
    build_reference(opt, model, batches, loss_fn, progress=True)
    assert len(bars) == 1 and bars[0]["total"] == 3
