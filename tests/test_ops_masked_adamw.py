"""Compact-state masked AdamW on every backend against the reference (bit for bit on the C++ kernels
and the Triton interpreter), with the fused non-finite skip and GradScaler's protocol, and the
reference against torch.optim.AdamW on the active subset."""
import pytest
import torch

from cpl_kernels import ops, reference as ref
from tolerances import PARAM_DTYPES, PARAM_TOL, STATE_TOL, bitwise, shapes_for

ROW = 512  # a Llama-ish row: two rows per 1024-element block, so row masks make half-active blocks


def make_mask(n, pattern, gen):
    """pattern: an active fraction (random elements), "rows" (30% of 512-element rows) or "words"
    (40% of 32-element runs: the kernels' whole-word runs of one word and more)."""
    if pattern in ("rows", "words"):
        run, frac = (ROW, 0.3) if pattern == "rows" else (32, 0.4)
        runs = torch.rand((n + run - 1) // run, generator=gen) < frac
        mask = runs.repeat_interleave(run)[:n]
    else:
        mask = torch.rand(n, generator=gen) < pattern
    if n >= 2100 and pattern not in (0.0, 1.0):  # a fully active and a fully frozen block
        mask[:1024] = True
        mask[1024:2048] = False
    return mask


def compact_state(n, pattern, seed, device):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(n, pattern, gen)
    words = ref.pack_mask(mask)
    offsets = ref.mask_block_offsets(words, n)
    active = int(mask.sum())
    m = torch.randn(active, generator=gen).mul_(0.1)
    v = torch.rand(active, generator=gen).mul_(0.1)
    return mask, words.to(device), offsets.to(device), m.to(device), v.to(device)


def poison(grad, mask, gen):
    """NaN/inf at a few active and a few frozen elements; returns the active non-finite count."""
    n = grad.numel()
    if n < 8:
        return 0
    picks = torch.randperm(n, generator=gen)[: max(4, n // 50)]
    values = torch.tensor([float("nan"), float("inf"), float("-inf")])
    grad[picks] = values[torch.arange(picks.numel()) % 3].to(grad.dtype)
    return int(mask[picks].sum())


def assert_matches(actual, expected, dtype, msg, exact, tol=None):
    actual = actual.cpu()
    if exact:
        if not torch.equal(actual, expected):
            differ = int((actual.float() != expected.float()).sum())
            raise AssertionError(f"{msg}: {differ} of {actual.numel()} elements differ from the reference")
        return
    tol = tol or PARAM_TOL[torch.float32]
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, **tol, msg=msg)
    else:  # bf16/fp16 on a GPU backend: one rounding of the param dtype apart at most
        torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-2, atol=1e-2, msg=msg)


def test_reference_offsets_count_active_elements_before_each_block():
    mask = torch.zeros(3000, dtype=torch.bool)
    mask[5], mask[1023], mask[1024], mask[2999] = True, True, True, True
    offsets = ref.mask_block_offsets(ref.pack_mask(mask), 3000)
    assert offsets.tolist() == [0, 2, 3]
    assert torch.equal(ref.unpack_mask(ref.pack_mask(mask), 3000), mask)


CONFIGS = [  # (skip_nonfinite, grad_scale)
    (False, None), (True, None), (True, 1024.0)]


@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "skip", "skip-scaled"])
@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("pattern", [0.0, 0.05, 0.3, 0.7, 1.0, "rows", "words"])
def test_masked_adamw_matches_reference(backend, dtype, pattern, config):
    device, name = backend
    skip, scale = config
    exact = bitwise(device, name)
    for n in shapes_for(name):
        gen = torch.Generator().manual_seed(n)
        p = torch.randn(n, generator=gen).to(dtype).to(device)
        mask, words, offsets, m, v = compact_state(n, pattern, n + 1, device)
        grad = torch.randn(n, generator=gen)
        if scale:
            grad = grad * scale  # a power of two: unscaling is exact
        grad = grad.to(dtype)
        bad_active = poison(grad, mask, gen) if skip else 0
        grad = grad.to(device)
        rp, rm, rv = p.cpu().clone(), m.cpu().clone(), v.cpu().clone()
        before = p.cpu().clone()
        for step in (1, 4):
            hyper = (step, 0.05, 0.9, 0.999, 1e-3, 0.1, skip)
            amp = (None if scale is None else torch.tensor(scale, device=device), None)
            got = ops.masked_adamw_step_(p, grad, words, offsets, m, v, *hyper, *amp)
            want = ref.masked_adamw_step_(rp, grad.cpu(), words.cpu(), offsets.cpu(), rm, rv, *hyper,
                                          None if scale is None else torch.tensor(scale), None)
            msg = f"{name} n={n} step={step}"
            assert got.dtype == torch.int64 and got.dim() == 0, msg
            assert int(got) == int(want) == bad_active, msg
            assert torch.equal(p.cpu()[~mask], before[~mask]), msg  # frozen: never move, no decay
            assert_matches(p, rp, dtype, msg, exact)
            assert_matches(m, rm, dtype, msg, exact, STATE_TOL)
            assert_matches(v, rv, dtype, msg, exact, STATE_TOL)
            assert bool(torch.isfinite(m).all() and torch.isfinite(v).all()), msg


def test_reference_skips_nonfinite_active_elements_entirely():
    """The contract, checked by hand: an active element with a NaN/inf gradient keeps p, m, v."""
    n = 64
    mask, words, offsets, m, v = compact_state(n, 0.5, 3, "cpu")
    active = mask.nonzero().view(-1)
    grad = torch.randn(n)
    grad[active[0]], grad[active[1]] = float("nan"), float("inf")
    p = torch.randn(n)
    p0, m0, v0 = p.clone(), m.clone(), v.clone()
    count = ref.masked_adamw_step_(p, grad, words, offsets, m, v, 1, 0.05, 0.9, 0.999, 1e-8, 0.1, True)
    assert int(count) == 2
    assert torch.equal(p[active[:2]], p0[active[:2]])
    assert torch.equal(m[:2], m0[:2]) and torch.equal(v[:2], v0[:2])  # compact entries 0 and 1
    assert not torch.equal(p[active[2:]], p0[active[2:]]) and torch.isfinite(p).all()


def test_found_inf_skips_the_whole_step(backend):
    device, name = backend
    n = 3000
    mask, words, offsets, m, v = compact_state(n, 0.3, 5, device)
    p = torch.randn(n).to(device)
    before = [t.clone() for t in (p, m, v)]
    count = ops.masked_adamw_step_(p, torch.randn(n).to(device), words, offsets, m, v, 1, 0.05, 0.9, 0.999,
                                   1e-8, 0.1, True, torch.tensor(2.0, device=device),
                                   torch.tensor(1.0, device=device))
    assert int(count) == 0
    assert all(torch.equal(a, b) for a, b in zip((p, m, v), before))


def test_wrapper_rejects_bad_amp_scalars():
    n = 40
    _, words, offsets, m, v = compact_state(n, 0.3, 1, "cpu")
    args = (torch.randn(n), torch.randn(n), words, offsets, m, v, 1, 0.05, 0.9, 0.999, 1e-8, 0.0, True)
    with pytest.raises(ValueError, match="'grad_scale' must be a one-element floating-point tensor"):
        ops.masked_adamw_step_(*args, torch.ones(2))
    with pytest.raises(ValueError, match="'skip_nonfinite' must be a bool"):
        ops.masked_adamw_step_(*args[:-1], 1)


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
