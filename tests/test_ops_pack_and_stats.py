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


# Edge cases of the sign class and the fp64 products (the CPU kernel decides the class on the fp32
# factors, 8 lanes at a time, with a scalar tail): ties, NaN, inf, signed zeros, fp32 denormals
# whose products underflow in fp32 but not in fp64, products that overflow fp32, sizes around the
# 8-lane group, the 32-bit mask word and the 64K-element chunk.
EDGE_SIZES = [0, 1, 7, 8, 9, 31, 32, 33, 63, 65, 1000, 2**16 + 33, 2**20 + 7]
EDGE_SMALL_SIZES = [0, 1, 7, 8, 9, 31, 32, 33, 63, 65, 1000]


def edge_values(n: int, dtype, seed: int, with_inf: bool, denormals: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (a, b) of `dtype` drawing each element from a pool of special values and random ones:
    signed zeros, NaN, +-1 ties, the largest finite values (products overflow the dtype, not fp64),
    the smallest normal and denormal values (products underflow the dtype, not fp64), inf."""
    g = torch.Generator().manual_seed(seed)
    fi = torch.finfo(dtype)
    denormal = fi.tiny * fi.eps  # the smallest positive denormal
    pool = torch.tensor([0.0, -0.0, float("nan"), 1.0, -1.0, 0.5, -2.0, fi.tiny, -fi.tiny, fi.max, -fi.max, fi.max / 3,
                         -1 / 3]
                        + ([denormal, -denormal, 3 * denormal, -5 * denormal] if denormals else [])
                        + ([float("inf"), float("-inf")] if with_inf else []), dtype=torch.float64).to(dtype)
    a = torch.randn(n, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    pick = torch.rand(n, generator=g) < 0.5
    a = torch.where(pick, pool[torch.randint(0, len(pool), (n,), generator=g)], a)
    pick = torch.rand(n, generator=g) < 0.5
    b = torch.where(pick, pool[torch.randint(0, len(pool), (n,), generator=g)], b)
    tie = torch.rand(n, generator=g) < 0.1  # a * b == -(a' * b'): equal and opposite contributions
    b[tie] = torch.where(torch.arange(n)[tie] % 2 == 0, 1.0, -1.0).to(dtype)
    a[tie] = a[tie].abs().nan_to_num(0.0, 1.0, 1.0)
    return a, b


def check_stats(counts, sums, mask, rc, rs, ref_mask, what):
    assert torch.equal(counts.cpu(), rc), f"{what}: counts {counts.tolist()} != {rc.tolist()}"
    torch.testing.assert_close(sums.cpu(), rs, **SUM_TOL, equal_nan=True, msg=lambda m: f"{what}: {m}")
    if mask is not None:
        assert torch.equal(mask.cpu(), ref_mask), f"{what}: mask words differ"


@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("with_inf", [False, True])
def test_contribution_stats_edge_values(backend, dtype, with_inf):
    device, name = backend
    for n in EDGE_SMALL_SIZES if name == "triton" else EDGE_SIZES:
        # The Triton 3.7 interpreter converts bf16 denormals to fp32 wrongly (9.2e-41 -> 0, -4.6e-40 ->
        # -2.9e-39), before any of our code runs: no bf16 denormals there.
        interp_bf16 = name == "triton" and device == "cpu" and dtype == torch.bfloat16
        a, b = edge_values(n, dtype, seed=n, with_inf=with_inf, denormals=not interp_bf16)
        mask = ops.empty_mask(a).fill_(-1).to(device)  # every word must be written, bits past n cleared
        counts, sums = ops.contribution_stats(a.to(device), b.to(device), mask)
        ref_mask = ops.empty_mask(a)
        rc, rs = ref.contribution_stats(a, b, ref_mask)
        check_stats(counts, sums, mask, rc, rs, ref_mask, f"n={n} {dtype}")

        codes = ref.pack_signs_(b, torch.empty(ref.num_code_words(n), dtype=torch.int32))
        mask.fill_(-1)
        counts, sums = ops.contribution_stats_codes(a.to(device), codes.to(device), mask)
        rc, rs = ref.contribution_stats_codes(a, codes, ref_mask)
        check_stats(counts, sums, mask, rc, rs, ref_mask, f"codes n={n} {dtype}")
        if not with_inf and n:
            assert torch.isfinite(rs).all()  # the finite case really checks the sums


def test_contribution_stats_sign_of_underflowing_products(backend):
    """1e-30 * 1e-30 is 0 in fp32 but 1e-60 in fp64: the sign class comes from the fp64 product."""
    device, _ = backend
    a = torch.tensor([1e-30, -1e-30, 1e-40, 1.4e-45, -1.4e-45, 3e38, 0.0, float("inf")] * 5)
    b = torch.tensor([1e-30, 1e-30, -1e-40, 1.4e-45, 1.4e-45, -3e38, float("inf"), 0.0] * 5)
    mask = ops.empty_mask(a).to(device)
    counts, sums = ops.contribution_stats(a.to(device), b.to(device), mask)
    assert counts.cpu().tolist() == [10, 20, 10]
    expected_mask = ref.pack_mask(torch.tensor([True, False, False, True, False, False, True, True] * 5))
    assert torch.equal(mask.cpu(), expected_mask)
    assert float(sums[0]) == pytest.approx(5 * (1e-60 + float(torch.tensor(1.4e-45)) ** 2), rel=1e-12)


@pytest.mark.parametrize("op", ["pair", "codes"])
def test_contribution_stats_independent_of_thread_count(op):
    """Fixed chunks, partials summed in chunk order: bit-identical sums for any thread count."""
    a, b = edge_values(3 * 2**16 + 1000, torch.float32, seed=5, with_inf=False)
    codes = ref.pack_signs_(b, torch.empty(ref.num_code_words(b.numel()), dtype=torch.int32))
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(ops.contribution_stats(a, b) if op == "pair" else ops.contribution_stats_codes(a, codes))
    finally:
        torch.set_num_threads(threads)
    for counts, sums in results[1:]:
        assert torch.equal(counts, results[0][0]) and torch.equal(sums, results[0][1])
