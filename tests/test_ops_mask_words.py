"""cpl_mask_words on every backend against the reference: mask bits, block offsets and the active
count are exact; ties (zeros, NaN, a zero code) are collaborative; products that would underflow
in fp32 are still decided on signs; bad arguments raise before anything is written."""
import pytest
import torch

from cpl_kernels import ops, reference as ref
from tolerances import PARAM_DTYPES, shapes_for


def pair(n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=gen)
    b = torch.randn(n, generator=gen)
    if n >= 8:
        k = torch.randperm(n, generator=gen)
        a[k[0]], b[k[1]] = 0.0, 0.0  # zeros on either side: ties
        a[k[2]] = float("nan")
        a[k[3]], b[k[3]] = float("inf"), -1.0  # conflicting
        a[k[4]], b[k[4]] = float("-inf"), 0.0  # a tie (-inf * 0 is NaN)
        if dtype == torch.float32:  # products below fp32's range: still opposite signs
            a[k[5]], b[k[5]] = 1e-30, -1e-30
            a[k[6]], b[k[6]] = -1e-30, -1e-30
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("with_codes", [False, True], ids=["pair", "codes"])
def test_mask_words_match_reference(backend, dtype, with_codes):
    device, name = backend
    for n in shapes_for(name):
        a, b = pair(n, dtype, seed=n)
        codes = ref.pack_signs_(b, torch.empty(ref.num_code_words(n), dtype=torch.int32))
        args = (None, codes) if with_codes else (b, None)
        want_words = torch.zeros(ref.num_mask_words(n), dtype=torch.int32)
        want_offsets = torch.zeros(ref.num_offset_blocks(n), dtype=torch.int64)
        want = ref.cpl_mask_words(a, *args, want_words, want_offsets)
        words = torch.full((ref.num_mask_words(n),), 12345, dtype=torch.int32, device=device)  # overwritten
        offsets = torch.full((ref.num_offset_blocks(n),), -7, dtype=torch.int64, device=device)
        dev_args = tuple(None if x is None else x.to(device) for x in args)
        got = ops.cpl_mask_words(a.to(device), *dev_args, words, offsets)
        msg = f"{name} n={n}"
        assert got.dtype == torch.int64 and got.dim() == 0, msg
        assert torch.equal(words.cpu(), want_words), msg
        assert torch.equal(offsets.cpu(), want_offsets), msg
        assert int(got) == int(want) == int(ref.unpack_mask(want_words, n).sum()), msg
        # Without offsets: the same bits and count.
        words2 = ops.empty_mask(a.to(device))
        assert int(ops.cpl_mask_words(a.to(device), *dev_args, words2)) == int(want), msg
        assert torch.equal(words2.cpu(), want_words), msg


def test_reference_decides_on_signs():
    a = torch.tensor([1.0, -1.0, 0.0, float("nan"), 2.0, 1e-30, -3.0])
    b = torch.tensor([-2.0, -2.0, -1.0, 1.0, 0.0, -1e-30, 4.0])
    words = torch.zeros(1, dtype=torch.int32)
    offsets = torch.zeros(1, dtype=torch.int64)
    count = ref.cpl_mask_words(a, b, None, words, offsets)
    assert ref.unpack_mask(words, 7).tolist() == [False, True, True, True, True, False, False]
    assert int(count) == 4 and offsets.tolist() == [0]
    # The mask is contribution_stats' collaborative mask (products in fp64 there).
    stats_mask = torch.zeros(1, dtype=torch.int32)
    ref.contribution_stats(a, b, stats_mask)
    assert torch.equal(stats_mask, words)


def test_offsets_are_the_masked_adamw_layout():
    n = 5000
    a, b = pair(n, torch.float32, seed=1)
    words, offsets = ops.empty_mask(a), torch.empty(ref.num_offset_blocks(n), dtype=torch.int64)
    count = ops.cpl_mask_words(a, b, None, words, offsets)
    assert torch.equal(offsets, ref.mask_block_offsets(words, n))
    # A consistent compact state: the masked step accepts it as it is.
    m, v = torch.zeros(int(count)), torch.zeros(int(count))
    ops.masked_adamw_step_(torch.randn(n), torch.randn(n), words, offsets, m, v, 1, 0.01, 0.9, 0.999, 1e-8, 0.0)


BAD = {
    "neither": (lambda a, b, c, w, o: (a, None, None, w, o), "exactly one of 'b' and 'codes', got neither"),
    "both": (lambda a, b, c, w, o: (a, b, c, w, o), "exactly one of 'b' and 'codes', got both"),
    "short mask": (lambda a, b, c, w, o: (a, b, None, w[:-1], o), "'mask_out'"),
    "codes size": (lambda a, b, c, w, o: (a, None, c[:-1], w, o), "'codes'"),
    "b size": (lambda a, b, c, w, o: (a, b[:-1], None, w, o), "'b'"),
    "offsets size": (lambda a, b, c, w, o: (a, b, None, w, o[:-1]), "'block_offsets_out'"),
}


@pytest.mark.parametrize("via", ["ops", "direct"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_raise_before_writing(backend, case, via):
    device, name = backend
    if via == "direct" and name not in ("cpp", "cuda"):
        pytest.skip("the Python backends rely on ops' checks")
    n = 3000
    a, b = (t.to(device) for t in pair(n, torch.float32, seed=2))
    codes = ops.pack_signs_(b)
    words = torch.full((ref.num_mask_words(n),), 77, dtype=torch.int32, device=device)
    offsets = torch.full((ref.num_offset_blocks(n),), 5, dtype=torch.int64, device=device)
    make, match = BAD[case]
    fn = ops.cpl_mask_words if via == "ops" else torch.ops.cpl.cpl_mask_words
    with pytest.raises((ValueError, RuntimeError), match=match):
        fn(*make(a, b, codes, words, offsets))
    assert bool((words == 77).all()) and bool((offsets == 5).all())
