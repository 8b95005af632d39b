"""MaskedAdamW: equals AdamW restricted to the mask, compact state, checkpoints, mask builders."""
import copy

import pytest
import torch

from cpl_kernels import (CPLAdamW, MaskedAdamW, PackedMask, cpl_masks_once, mean_gradients, random_masks_like,
                         state_bytes)
from cpl_kernels import ops, reference as ref

SHAPES = [(257,), (13, 31), (1,), (2100,)]
HYPER = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.1)


def masks_for(params, frac, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(p.shape, generator=gen) < frac for p in params]


def test_equals_adamw_on_active_elements_and_frozen_never_move():
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    full = [torch.nn.Parameter(x.clone()) for x in init]
    masks = masks_for(ours, 0.3)
    masks[2] = torch.zeros(1, dtype=torch.bool)  # a tensor with nothing to train
    opt = MaskedAdamW(ours, masks=masks, **HYPER)
    # AdamW whose gradient is zero off the mask still decays and moves frozen elements by momentum:
    # the reference here is AdamW on the active elements only, gathered into dense tensors.
    active = [torch.nn.Parameter(x[m].clone()) for x, m in zip(init, masks)]
    theirs = torch.optim.AdamW(active, **HYPER)
    for t in range(50):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for p, q, g, m in zip(ours, active, grads, masks):
            p.grad, q.grad = g.clone(), g[m].clone()
        opt.step()
        theirs.step()
        for i, (p, q, x, m) in enumerate(zip(ours, active, init, masks)):
            assert torch.equal(p.detach()[~m], x[~m]), f"frozen elements moved (step {t}, param {i})"
            torch.testing.assert_close(p.detach()[m], q.detach(), rtol=1e-5, atol=1e-6)
    assert opt.active_counts() == [int(m.sum()) for m in masks]


def test_compact_state_bytes_at_30_percent_active():
    model = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.Linear(512, 1024))  # ~1M params
    n = sum(p.numel() for p in model.parameters())
    masks = masks_for(list(model.parameters()), 0.3)
    opt = MaskedAdamW(model.parameters(), masks=masks)
    for p in model.parameters():
        p.grad = torch.randn(p.shape)
    opt.step()
    per_param = opt.state_bytes() / n
    assert per_param <= 2.6, per_param
    expected = sum(4 * ref.num_mask_words(p.numel()) + 8 * ref.num_offset_blocks(p.numel()) + 8 * int(m.sum()) + 4
                   for p, m in zip(model.parameters(), masks))
    assert opt.state_bytes() == expected == state_bytes(opt)


def test_cpl_adamw_state_overhead_is_the_codes():
    model = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 7))
    n = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.randn(p.shape)
    theirs = torch.optim.AdamW(model.parameters())
    ours = CPLAdamW(model.parameters())
    ours.set_reference_from_grads()
    theirs.step()
    ours.step()
    extra = (ours.state_bytes() - state_bytes(theirs)) / n
    assert 0.25 <= extra <= 0.26, extra


def test_state_dict_round_trip_resumes_bit_exactly():
    gen = torch.Generator().manual_seed(1)
    a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    masks = masks_for(a, 0.4)
    opt = MaskedAdamW(a, masks=masks, **HYPER)
    for _ in range(5):
        for p in a:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())  # like torch.optim, a state_dict shares the live tensors
    opt2 = MaskedAdamW(b, masks=[torch.ones(s, dtype=torch.bool) for s in SHAPES], **HYPER)  # replaced by the load
    for p, q in zip(a, b):
        q.data.copy_(p.detach())
    opt2.load_state_dict(sd)
    assert opt2.active_counts() == opt.active_counts()
    for _ in range(5):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        opt2.step()
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    bad = opt.state_dict()
    bad["state"][0] = dict(bad["state"][0], exp_avg=torch.zeros(3))
    with pytest.raises(ValueError, match=r"exp_avg of parameter param_groups\[0\]\['params'\]\[0\].*active elements"):
        opt2.load_state_dict(bad)


def test_mask_errors_name_the_parameter():
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"mask for parameter 'weight' has shape \(4, 3\).*\(3, 4\)"):
        MaskedAdamW(model.named_parameters(), masks={"weight": torch.ones(4, 3, dtype=torch.bool)}, default="train")
    with pytest.raises(TypeError, match="'bias' must be a bool tensor"):
        MaskedAdamW(model.named_parameters(), masks={"bias": torch.ones(3)}, default="train")
    with pytest.raises(ValueError, match="got 1 masks for 2 parameters"):
        MaskedAdamW(model.parameters(), masks=[torch.ones(3, 4, dtype=torch.bool)])
    with pytest.warns(UserWarning, match=r"1 of 2 parameters have no mask and are trained on all elements: \[\"'bias'\"\]"):
        opt = MaskedAdamW(model.named_parameters(), masks={"weight": torch.zeros(3, 4, dtype=torch.bool)})
    assert opt.active_counts() == [0, 3]  # a parameter without a mask trains fully, and says so


def test_cpl_masks_once_and_random_masks():
    gen = torch.Generator().manual_seed(2)
    new = {"a": torch.randn(100, generator=gen), "b": torch.randn(7, 3, generator=gen)}
    refg = {"a": torch.randn(100, generator=gen), "b": None}
    refg["a"][:10] = 0.0
    masks = cpl_masks_once(new, refg)
    assert torch.equal(masks["a"], new["a"] * refg["a"] >= 0) and masks["b"].all()
    assert masks["a"][:10].all() and 20 < int(masks["a"].sum()) < 90
    listed = cpl_masks_once([new["a"]], [refg["a"]])
    assert torch.equal(listed[0], masks["a"])
    rnd = random_masks_like(masks, seed=3)
    assert all(int(rnd[k].sum()) == int(masks[k].sum()) and rnd[k].shape == masks[k].shape for k in masks)
    assert not torch.equal(rnd["a"], masks["a"])
    assert torch.equal(random_masks_like(masks, seed=3)["a"], rnd["a"])  # deterministic


def test_a_per_rank_checkpoint_into_whole_parameters_is_refused_by_name():
    model = torch.nn.Linear(4, 3)
    opt = MaskedAdamW(model.named_parameters(), masks=masks_for(list(model.parameters()), 0.5))
    sd = opt.state_dict()
    snap = {k: v.clone() for k, v in opt.state[model.weight].items()}
    sd["state"][0] = {"step": sd["state"][0]["step"], "cpl_shard_rank0": b"saved by an FSDP2 run"}
    with pytest.raises(ValueError, match=r"per-rank \(FSDP2\) state \['cpl_shard_rank0'\] for parameter 'weight'"):
        opt.load_state_dict(sd)
    assert all(torch.equal(opt.state[model.weight][k], v) for k, v in snap.items())


def test_nonfinite_gradients_are_skipped_counted_and_named():
    """check_finite="skip" (the default): an active element with a NaN/inf gradient keeps its value
    and state; a frozen element's gradient is never read; the warning names the parameter."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(4)) < 0.5
             for n, p in model.named_parameters()}
    masks["1.bias"] = torch.tensor([True, False, True])
    opt = MaskedAdamW(model.named_parameters(), masks=masks, lr=0.1)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    bias = model[1].bias
    before, state_before = bias.detach().clone(), opt.state[bias]["exp_avg"].clone()
    model(torch.randn(4, 6)).sum().backward()
    bias.grad[0], bias.grad[1] = float("nan"), float("inf")  # active, frozen
    weight_before = model[0].weight.detach().clone()
    with pytest.warns(RuntimeWarning, match=r"'1\.bias' \(1\)"):
        opt.step()
    assert bias.detach()[0] == before[0] and bias.detach()[1] == before[1]  # untouched, frozen
    assert bias.detach()[2] != before[2]  # the finite active element was stepped
    assert opt.state[bias]["exp_avg"][0] == state_before[0] and opt.state[bias]["exp_avg"][1] != state_before[1]
    assert not torch.equal(model[0].weight.detach(), weight_before)
    assert sum(opt.nonfinite_counts) == 1


def test_packed_masks_equal_bool_masks_and_train_identically():
    gen = torch.Generator().manual_seed(5)
    shapes = {"w": (37, 70), "b": (70,), "e": (2100,)}
    new = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    refg = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    refg["b"][:5] = 0.0
    bools = cpl_masks_once(new, refg)
    packed = cpl_masks_once(new, refg, packed=True)
    from_codes = cpl_masks_once(new, {k: ops.pack_signs_(r) for k, r in refg.items()}, packed=True)
    for k in shapes:
        assert isinstance(packed[k], PackedMask) and packed[k].shape == bools[k].shape
        assert torch.equal(packed[k].unpack(), bools[k]) and packed[k].active == int(bools[k].sum())
        assert torch.equal(packed[k].words, ref.pack_mask(bools[k]))
        assert torch.equal(packed[k].block_offsets, ref.mask_block_offsets(packed[k].words, bools[k].numel()))
        assert torch.equal(from_codes[k].words, packed[k].words)
    init = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    a = {k: torch.nn.Parameter(x.clone()) for k, x in init.items()}
    b = {k: torch.nn.Parameter(x.clone()) for k, x in init.items()}
    opt_a = MaskedAdamW([a[k] for k in shapes], masks=[bools[k] for k in shapes], **HYPER)
    opt_b = MaskedAdamW([b[k] for k in shapes], masks=[packed[k] for k in shapes], **HYPER)
    assert opt_a.state_bytes() == opt_b.state_bytes()
    for _ in range(3):
        for k in shapes:
            a[k].grad = torch.randn(shapes[k], generator=gen)
            b[k].grad = a[k].grad.clone()
        opt_a.step()
        opt_b.step()
        assert all(torch.equal(a[k], b[k]) for k in shapes)
    rnd = random_masks_like(packed, seed=1)
    assert all(isinstance(rnd[k], PackedMask) and rnd[k].active == packed[k].active for k in shapes)
    t = torch.nn.Parameter(torch.randn(70, 37).t())  # a transposed parameter: the mask is re-laid out
    opt_t = MaskedAdamW([t], masks=[packed["w"]])
    assert opt_t.active_counts() == [packed["w"].active]


def test_mean_gradients_is_the_mean_over_batches_and_puts_grads_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    unused = torch.nn.Linear(2, 2)
    model.add_module("unused", unused)
    batches = [torch.randn(5, 4) for _ in range(3)]

    def loss_fn(m, x):
        return m[1](m[0](x)).pow(2).mean()

    held = torch.ones(3, 4)
    model[0].weight.grad = held
    grads = mean_gradients(model, batches, loss_fn)
    assert model[0].weight.grad is held  # put back
    assert grads["unused.weight"] is None
    for name, p in model.named_parameters():
        if name.startswith("unused"):
            continue
        want = sum(torch.autograd.grad(loss_fn(model, x), p)[0] for x in batches) / len(batches)
        torch.testing.assert_close(grads[name], want, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match=r"mean_gradients: batches must be an iterable of batches"):
        mean_gradients(model, batches[0], loss_fn)
    with pytest.raises(ValueError, match=r"mean_gradients: batches yielded no batch"):
        mean_gradients(model, [], loss_fn)
    with pytest.raises(ValueError, match=r"mean_gradients: loss_fn must return a scalar loss.*batch 0"):
        mean_gradients(model, batches, lambda m, x: m[0](x))
    assert model[0].weight.grad is held  # after an error too
