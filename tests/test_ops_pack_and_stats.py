"""pack_signs_ and contribution_stats on every backend against the reference: bits and counts exact."""
import pytest
import torch

from cpl_kernels import ops, reference as ref
from tolerances import PARAM_DTYPES, SUM_TOL, shapes_for


def special_values(n: int, dtype, seed: int) -> torch.Tensor:
    """Random values with exact zeros, signed zeros, NaN and inf sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if n:
        idx = torch.randint(0, n, (max(1, n // 7),), generator=g)
        x[idx] = 0.0
        x[idx[: len(idx) // 2]] = -0.0
        if n > 10:
            x[3] = float("nan")
            x[5] = float("inf")
            x[7] = float("-inf")
    return x.to(dtype)


@pytest.mark.parametrize("dtype", PARAM_DTYPES)
def test_pack_signs_matches_reference(backend, dtype):
    device, name = backend
    for n in shapes_for(name):
        src = special_values(n, dtype, seed=n).to(device)
        codes = torch.full((ref.num_code_words(n),), -1, dtype=torch.int32, device=device)
        ops.pack_signs_(src, codes)
        expected = ref.pack_signs_(src.cpu(), torch.empty_like(codes.cpu()))
        assert torch.equal(codes.cpu(), expected), f"n={n}"


def test_reference_codes_round_trip():
    x = special_values(1000, torch.float32, seed=0)
    codes = ref.pack_signs_(x, ops.empty_codes(x))
    signs = ref.unpack_signs(codes, x.numel())
    expected = torch.where(x.isnan(), 0.0, torch.sign(x))
    assert torch.equal(signs, expected)


@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("with_mask", [False, True])
def test_contribution_stats_matches_reference(backend, dtype, with_mask):
    device, name = backend
    for n in shapes_for(name):
        a = special_values(n, dtype, seed=2 * n).to(device)
        b = special_values(n, dtype, seed=2 * n + 1).to(device)
        mask = ops.empty_mask(a).fill_(-1) if with_mask else None
        counts, sums = ops.contribution_stats(a, b, mask)
        ref_mask = ops.empty_mask(a).cpu() if with_mask else None
        rc, rs = ref.contribution_stats(a.cpu(), b.cpu(), ref_mask)
        assert torch.equal(counts.cpu(), rc), f"n={n}"
        torch.testing.assert_close(sums.cpu(), rs, **SUM_TOL, equal_nan=True)
        if with_mask:
            assert torch.equal(mask.cpu(), ref_mask), f"n={n}"


@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("with_mask", [False, True])
def test_contribution_stats_codes_matches_reference(backend, dtype, with_mask):
    device, name = backend
    for n in shapes_for(name):
        a = special_values(n, dtype, seed=3 * n).to(device)
        codes = ref.pack_signs_(special_values(n, torch.float32, seed=3 * n + 1),
                                torch.empty(ref.num_code_words(n), dtype=torch.int32)).to(device)
        mask = ops.empty_mask(a).fill_(-1) if with_mask else None
        counts, sums = ops.contribution_stats_codes(a, codes, mask)
        ref_mask = ops.empty_mask(a).cpu() if with_mask else None
        rc, rs = ref.contribution_stats_codes(a.cpu(), codes.cpu(), ref_mask)
        assert torch.equal(counts.cpu(), rc), f"n={n}"
        torch.testing.assert_close(sums.cpu(), rs, **SUM_TOL, equal_nan=True)
        if with_mask:
            assert torch.equal(mask.cpu(), ref_mask), f"n={n}"


def test_reference_stats_decompose_dot_product():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5000, generator=g), torch.randn(5000, generator=g)
    counts, sums = ref.contribution_stats(a, b)
    assert int(counts.sum()) == 5000
    torch.testing.assert_close(sums.sum(), torch.dot(a.double(), b.double()), rtol=1e-12, atol=1e-12)
    assert sums[0] > 0 and sums[1] < 0
    prod = a.double() * b.double()
    assert int(counts[0]) == int((prod > 0).sum()) and int(counts[1]) == int((prod < 0).sum())
