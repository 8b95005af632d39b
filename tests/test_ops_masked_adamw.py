"""Compact-state masked AdamW on every backend against the reference, and the reference against
torch.optim.AdamW on the active subset."""
import pytest
import torch

from cpl_kernels import ops, reference as ref
from tolerances import PARAM_DTYPES, STATE_TOL, assert_close_to_reference, bitwise, shapes_for


def compact_state(n, active_fraction, seed, device):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, generator=gen) < active_fraction
    if n >= 2100:  # a fully active and a fully frozen 1024-block exercise both ends of the offsets
        mask[:1024] = True
        mask[1024:2048] = False
    words = ref.pack_mask(mask)
    offsets = ref.mask_block_offsets(words, n)
    active = int(mask.sum())
    m = torch.randn(active, generator=gen).mul_(0.1)
    v = torch.rand(active, generator=gen).mul_(0.1)
    return mask, words.to(device), offsets.to(device), m.to(device), v.to(device)


def test_reference_offsets_count_active_elements_before_each_block():
    mask = torch.zeros(3000, dtype=torch.bool)
    mask[5], mask[1023], mask[1024], mask[2999] = True, True, True, True
    offsets = ref.mask_block_offsets(ref.pack_mask(mask), 3000)
    assert offsets.tolist() == [0, 2, 3]
    assert torch.equal(ref.unpack_mask(ref.pack_mask(mask), 3000), mask)


@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("active_fraction", [0.0, 0.3, 1.0])
def test_masked_adamw_matches_reference(backend, dtype, active_fraction):
    device, name = backend
    exact = bitwise(device, name)
    for n in shapes_for(name):
        gen = torch.Generator().manual_seed(n)
        p = torch.randn(n, generator=gen).to(dtype).to(device)
        grad = torch.randn(n, generator=gen).to(dtype).to(device)
        mask, words, offsets, m, v = compact_state(n, active_fraction, n + 1, device)
        rp, rm, rv = p.cpu().clone(), m.cpu().clone(), v.cpu().clone()
        fp, fm, fv = p.cpu().float().clone(), m.cpu().clone(), v.cpu().clone()
        before = p.cpu().clone()
        for step in (1, 4):
            hyper = (step, 0.05, 0.9, 0.999, 1e-3, 0.1)
            ops.masked_adamw_step_(p, grad, words, offsets, m, v, *hyper)
            ref.masked_adamw_step_(rp, grad.cpu(), words.cpu(), offsets.cpu(), rm, rv, *hyper)
            if not exact:  # the fp32 computation is only the bf16/fp16 tolerance's yardstick
                ref.masked_adamw_step_(fp, grad.cpu().float(), words.cpu(), offsets.cpu(), fm, fv, *hyper)
            msg = f"n={n} step={step}"
            assert torch.equal(p.cpu()[~mask], before[~mask]), msg  # frozen: never move, no decay
            assert_close_to_reference(p, rp, fp, dtype, msg, exact=exact)
            assert_close_to_reference(m, rm, fm, dtype, msg, STATE_TOL, exact=exact)
            assert_close_to_reference(v, rv, fv, dtype, msg, STATE_TOL, exact=exact)


def test_reference_equals_torch_adamw_on_the_active_subset():
    n = 5000
    mask, words, offsets, _, _ = compact_state(n, 0.3, 7, "cpu")
    active = int(mask.sum())
    gen = torch.Generator().manual_seed(8)
    p = torch.randn(n, generator=gen)
    sub = torch.nn.Parameter(p[mask].clone())
    opt = torch.optim.AdamW([sub], lr=1e-2, weight_decay=0.05)
    m, v = torch.zeros(active), torch.zeros(active)
    for t in range(1, 51):
        g = torch.randn(n, generator=gen)
        sub.grad = g[mask].clone()
        opt.step()
        ref.masked_adamw_step_(p, g, words, offsets, m, v, t, 1e-2, 0.9, 0.999, 1e-8, 0.05)
    torch.testing.assert_close(p[mask], sub.detach(), rtol=1e-5, atol=1e-6)
