"""MaskedAdamW.update_masks: the compact state migrated as a plain dense reference migration says
(kept elements keep m and v, new ones start at zero, dropped ones go), the step count kept, the
training after it equal to the reference step, the memory held afterwards, all or nothing."""
import gc
import weakref

import pytest
import torch

from cpl_kernels import MaskedAdamW, PackedMask
from cpl_kernels import reference as ref
from cpl_kernels.optim import _layout, _mask_state

HYPER = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.1)


def params_of(seed=0):
    """Shapes with partial words and blocks, one over several chunks (CHUNK is lowered to 2048
    below), and a transposed view stepped in memory order."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=gen) for s in [(257,), (13, 31), (1,), (5000,)]]
    tensors.append(torch.randn(40, 70, generator=gen).t())  # memory order != logical order
    return [torch.nn.Parameter(t) for t in tensors]


def rand_masks(params, frac, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(p.shape, generator=gen) < frac for p in params]


def mem_flat(t, p):
    return _layout.flat_in_layout_of(t, p)


def dense_state(p, st):
    """m and v scattered to one entry per element of p (memory order), zero where frozen."""
    n = p.numel()
    active = ref.unpack_mask(st["mask_words"], n)
    out = []
    for key in ("exp_avg", "exp_avg_sq"):
        d = torch.zeros(n)
        d[active] = st[key]
        out.append(d)
    return active, out


def train(opt, params, gen, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(_mask_state, "CHUNK", 2048)  # several chunks per large parameter


def test_migration_equals_the_dense_reference_and_training_continues_like_it():
    params = params_of()
    opt = MaskedAdamW(params, masks=rand_masks(params, 0.4, seed=1), **HYPER)
    gen = torch.Generator().manual_seed(2)
    train(opt, params, gen, 4)
    before = [dense_state(p, opt.state[p]) for p in params]
    steps = [float(opt.state[p]["step"]) for p in params]
    new = rand_masks(params, 0.6, seed=3)
    new[2] = torch.zeros(1, dtype=torch.bool)  # everything dropped
    opt.update_masks(new)
    # The reference migration: dense m, v zero off the old mask, read at the new mask's elements.
    expected = []
    for p, m, (old_active, (dm, dv)) in zip(params, new, before):
        new_active = mem_flat(m, p)
        st = opt.state[p]
        assert torch.equal(st["exp_avg"], dm[new_active]) and torch.equal(st["exp_avg_sq"], dv[new_active])
        assert torch.equal(st["mask_words"], ref.pack_mask(new_active))
        assert torch.equal(st["block_offsets"], ref.mask_block_offsets(ref.pack_mask(new_active), p.numel()))
        kept, born = old_active & new_active, new_active & ~old_active
        if p.numel() > 100:
            assert kept.any() and born.any() and (old_active & ~new_active).any()  # every case occurs
        assert torch.all(dm[new_active & ~old_active] == 0)
        expected.append((p.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone(),
                         st["mask_words"].clone(), st["block_offsets"].clone()))
    assert [float(opt.state[p]["step"]) for p in params] == steps  # the step count stays
    # Training on: equal to reference.masked_adamw_step_ from the reference-migrated state.
    for t in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for (q, m, v, w, off), p, g in zip(expected, params, grads):
            if m.numel():
                q_flat, g_flat = mem_flat(q, p).clone(), mem_flat(g, p)
                ref.masked_adamw_step_(q_flat, g_flat, w, off, m, v, steps[0] + t + 1,
                                       HYPER["lr"], *HYPER["betas"], HYPER["eps"], HYPER["weight_decay"])
                q.copy_(q_flat.view(q.shape) if q.is_contiguous() else q_flat.view(q.t().shape).t())
            assert torch.equal(p.detach(), q)
            assert torch.equal(opt.state[p]["exp_avg"], m) and torch.equal(opt.state[p]["exp_avg_sq"], v)


def test_same_mask_changes_nothing_and_packed_words_equal_bools():
    params = params_of()
    masks = rand_masks(params, 0.5, seed=4)
    opt = MaskedAdamW(params, masks=masks, **HYPER)
    train(opt, params, torch.Generator().manual_seed(5), 3)
    snap = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    opt.update_masks(masks)
    for p in params:
        assert all(torch.equal(opt.state[p][k], v) for k, v in snap[p].items())
    new = rand_masks(params, 0.3, seed=6)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = MaskedAdamW(twin_params, masks=masks, **HYPER)
    twin.load_state_dict(opt.state_dict())
    opt.update_masks(new)
    twin.update_masks([_mask_state.pack_bool(mem_flat(m, p)) for m, p in zip(new, twin_params)])
    for p, q in zip(params, twin_params):
        assert all(torch.equal(opt.state[p][k], twin.state[q][k]) for k in opt.state[p])
    # PackedMask (row-major bits, as cpl_masks_once(..., packed=True) builds them): the same state,
    # the transposed parameter's mask re-laid out in its memory order.
    newer = rand_masks(params, 0.6, seed=7)
    opt.update_masks(newer)
    twin.update_masks([PackedMask.from_bool(m) for m in newer])
    for p, q in zip(params, twin_params):
        assert all(torch.equal(opt.state[p][k], twin.state[q][k]) for k in opt.state[p])


def test_memory_after_update_is_8_bytes_per_active_element_plus_the_mask():
    model = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.Linear(512, 1024))
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    opt = MaskedAdamW(params, masks=rand_masks(params, 0.3, seed=0))
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    old = [weakref.ref(opt.state[p][k]) for p in params for k in ("exp_avg", "exp_avg_sq")]
    for frac in (0.1, 0.7):
        new = rand_masks(params, frac, seed=int(frac * 10))
        opt.update_masks(new)
        gc.collect()
        assert all(r() is None for r in old), "the old compact state is still held"
        active = sum(int(m.sum()) for m in new)
        assert opt.active_counts() == [int(m.sum()) for m in new]
        overhead = (opt.state_bytes() - 8 * active) / n
        assert overhead <= 0.14, overhead  # words 0.125 + offsets 0.0078 + 4 B step per tensor
        assert opt.state_bytes() == sum(4 * ref.num_mask_words(p.numel()) + 8 * ref.num_offset_blocks(p.numel())
                                        + 8 * int(m.sum()) + 4 for p, m in zip(params, new))
        old = [weakref.ref(opt.state[p][k]) for p in params for k in ("exp_avg", "exp_avg_sq")]


def snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params})


def assert_unchanged(opt, params, snap):
    values, state = snap
    assert all(torch.equal(p.detach(), v) for p, v in zip(params, values))
    for p in params:
        assert opt.state[p].keys() == state[p].keys()
        assert all(torch.equal(opt.state[p][k], v) for k, v in state[p].items())


def test_a_bad_mask_anywhere_changes_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    params = list(model.parameters())
    opt = MaskedAdamW(model.named_parameters(), masks=rand_masks(params, 0.5, seed=0), **HYPER)
    train(opt, params, torch.Generator().manual_seed(1), 2)
    snap = snapshot(opt, params)
    good = rand_masks(params, 0.5, seed=2)
    cases = [
        (good[:3] + [torch.ones(5, dtype=torch.bool)], ValueError, r"'1\.bias' has shape \(5,\).*\(3,\)"),
        (good[:3] + [torch.ones(3)], TypeError, r"'1\.bias' must be a bool tensor"),
        (good[:3], ValueError, "got 3 masks for 4 parameters"),
        ({"0.weight": good[0], "1.wieght": good[2]}, ValueError, r"1 mask key\(s\) match no parameter.*'1\.wieght'"),
        (good[:3] + [torch.zeros(2, dtype=torch.int32)], ValueError, r"'1\.bias' has 2 int32 words.*needs 1"),
        (good[:3] + [torch.full((1,), 8, dtype=torch.int32)], ValueError, "bits set past its 3 elements"),
        (good[0], TypeError, "masks must be a sequence"),
    ]
    for masks, exc, match in cases:
        with pytest.raises(exc, match=match):
            opt.update_masks(masks)
        assert_unchanged(opt, params, snap)
    with pytest.raises(ValueError, match="default must be 'keep', 'train' or 'freeze'"):
        opt.update_masks(good, default="none")
    assert_unchanged(opt, params, snap)


def test_default_says_what_happens_to_parameters_left_out():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    params = list(model.parameters())
    opt = MaskedAdamW(model.named_parameters(), masks=rand_masks(params, 0.5, seed=0), **HYPER)
    train(opt, params, torch.Generator().manual_seed(1), 2)
    kept = {k: v.clone() for k, v in opt.state[params[3]].items()}
    new0 = torch.ones(5, 6, dtype=torch.bool)
    opt.update_masks({"0.weight": new0})  # default "keep": the others keep mask and state
    assert all(torch.equal(opt.state[params[3]][k], v) for k, v in kept.items())
    assert opt.active_counts()[0] == 30
    opt.update_masks([None, None, None, torch.ones(3, dtype=torch.bool)], default="freeze")
    assert opt.active_counts() == [0, 0, 0, 3]
    opt.update_masks({}, default="train")
    assert opt.active_counts() == [p.numel() for p in params]


def test_a_parameter_added_later_gets_its_mask_from_update_masks():
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(7))
    opt = MaskedAdamW([a], masks=[torch.ones(10, dtype=torch.bool)], **HYPER)
    opt.add_param_group({"params": [b]})
    b.grad, a.grad = torch.randn(7), torch.randn(10)
    with pytest.raises(RuntimeError, match="no mask state.*update_masks"):
        opt.step()
    mask = torch.arange(7) % 2 == 0
    opt.update_masks([None, mask])
    before = b.detach().clone()
    opt.step()
    assert torch.equal(b.detach()[~mask], before[~mask]) and not torch.equal(b.detach()[mask], before[mask])
    assert opt.active_counts() == [10, 4]


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 1000, 2047, 2048, 2049, 4096 + 37])
def test_pack_and_unpack_equal_the_reference_across_chunks(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    words = _mask_state.pack_bool(mask)
    assert torch.equal(words, ref.pack_mask(mask) if n else torch.zeros(0, dtype=torch.int32))
    assert torch.equal(_mask_state.unpack_chunk(words, n), mask)
    assert torch.equal(_mask_state.pack_bool(mask[1:]), ref.pack_mask(mask[1:]) if n > 1 else
                       torch.zeros(ref.num_mask_words(max(n - 1, 0)), dtype=torch.int32))  # odd offset
