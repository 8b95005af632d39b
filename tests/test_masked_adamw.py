"""MaskedAdamW: equals AdamW restricted to the mask, compact state, checkpoints, mask builders."""
import copy

import pytest
import torch

from cpl_kernels import CPLAdamW, MaskedAdamW, cpl_masks_once, random_masks_like, state_bytes
from cpl_kernels import reference as ref

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
