"""The 8-bit blockwise format (cpl_kernels/quant8.py): the maps against their published definition
(and torchao's, when installed), the kernels' threshold search against the reference rule on
every map value, every threshold and their fp32 neighbours, and the reference's block
quantization against torchao's functions (equal but for the unsigned map's floor)."""
import pytest
import torch

from cpl_kernels import quant8


def published_map(signed: bool) -> list[float]:
    """bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8), restated: per
    decade i, the midpoints of 2**i (signed) or 2**(i+1) (unsigned) equal steps of [0.1, 1], scaled
    by 10**(i-6) (an fp32 tensor times a Python float, as the published code computes it); then
    0 and 1."""
    out = [0.0, 1.0]
    for i in range(7):
        steps = 2 ** i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1, steps + 1)
        mids = (edges[:-1] + edges[1:]) / 2
        out += (10 ** (i - 6) * mids).tolist()
        if signed:
            out += (-(10 ** (i - 6)) * mids).tolist()
    return torch.tensor(sorted(out), dtype=torch.float32).tolist()


@pytest.mark.parametrize("signed", [True, False])
def test_maps_are_the_published_dynamic_maps(signed):
    qmap = quant8.dynamic_map(signed)
    assert len(qmap) == 256 and len(set(qmap)) == 256
    assert list(qmap) == sorted(qmap)
    assert list(qmap) == published_map(signed)
    assert qmap[-1] == 1.0 and 0.0 in qmap
    if signed:
        assert qmap[0] < -0.99
    else:
        assert qmap[0] == 0.0


@pytest.mark.parametrize("signed", [True, False])
def test_maps_equal_torchao(signed):
    qu = pytest.importorskip("torchao.optim.quant_utils")
    assert list(quant8.dynamic_map(signed)) == torch.tensor(qu.create_dynamic_map(signed), dtype=torch.float32).tolist()


def probes(signed: bool) -> torch.Tensor:
    qmap = torch.tensor(quant8.dynamic_map(signed))
    th = torch.tensor(quant8.thresholds(signed)[:-1])
    down, up = torch.tensor(float("-inf")), torch.tensor(float("inf"))
    edge = torch.cat([qmap, th])
    gen = torch.Generator().manual_seed(0)
    return torch.cat([edge, torch.nextafter(edge, down), torch.nextafter(edge, up),
                      torch.rand(200_000, generator=gen) * 2 - 1, torch.rand(10_000, generator=gen) * 1e-5,
                      torch.tensor([float("nan"), float("inf"), float("-inf"), -1.0, 1.0, 0.0, -0.0, 2.0, -2.0,
                                    quant8.FLOOR, quant8.FLOOR / 2, 1e-30, 1e-44, -1e-30])])


@pytest.mark.parametrize("signed", [True, False])
def test_threshold_search_is_the_reference_rule(signed):
    qmap = torch.tensor(quant8.dynamic_map(signed))
    th = torch.tensor(quant8.thresholds(signed))
    y = probes(signed)
    assert torch.equal(quant8.quantize_by_thresholds(y, th), quant8.rule(y, qmap))
    assert quant8.quantize_by_thresholds(torch.tensor([float("nan")]), th).item() == 0
    # every map value is its own code
    assert torch.equal(quant8.quantize_by_thresholds(qmap, th), torch.arange(256))


@pytest.mark.parametrize("signed", [True, False])
def test_reference_rule_equals_torchao(signed):
    qu = pytest.importorskip("torchao.optim.quant_utils")
    qmap = torch.tensor(quant8.dynamic_map(signed))
    y = probes(signed)
    torchao = qu.quantize_8bit_with_qmap(y, qmap).long()
    assert torch.equal(quant8._search(y, qmap), torchao)
    # the rule differs only by the unsigned map's floor: code 1 for y in [FLT_MIN, first threshold)
    differ = quant8.rule(y, qmap) != torchao
    if signed:
        assert not differ.any()
    else:
        assert differ.any()
        assert bool(((y[differ] >= quant8.FLOOR) & (torchao[differ] == 0) & (quant8.rule(y, qmap)[differ] == 1)).all())


def test_unsigned_floor_keeps_positive_v_off_code_0():
    qmap = torch.tensor(quant8.dynamic_map(False))
    th = quant8.thresholds(False)
    assert th[0] == quant8.FLOOR and th[1] == quant8.thresholds(False)[1] > 1e-7
    y = torch.tensor([0.0, quant8.FLOOR / 2, quant8.FLOOR, 1e-30, 1e-9, 1.6e-7, 3.25e-7])
    assert quant8.rule(y, qmap).tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert quant8.thresholds(True)[0] < -0.9  # the signed map (m) has no floor


@pytest.mark.parametrize("n", [256, 4096, 256 * 37])
def test_block_quantization_equals_torchao(n):
    qu = pytest.importorskip("torchao.optim.quant_utils")
    gen = torch.Generator().manual_seed(n)
    for signed in (True, False):
        x = torch.randn(n, generator=gen) * torch.logspace(-8, 1, n)[torch.randperm(n, generator=gen)]
        x[:256] = 0.0  # an all-zero block: absmax clipped at 1e-12
        if not signed:
            x = x.abs()
        qmap = torch.tensor(quant8.dynamic_map(signed))
        codes, absmax = torch.empty(n, dtype=torch.uint8), torch.empty(quant8.num_blocks(n))
        quant8.quantize_(x, codes, absmax, qmap)
        scaled, scale = qu.scale_tensor(x, quant8.BLOCK)
        assert torch.equal(absmax, scale)
        assert torch.equal(codes, quant8.rule(scaled, qmap).to(torch.uint8))
        floored = codes.long() != qu.quantize_8bit_with_qmap(scaled, qmap).long()  # v under the floor only
        assert bool(((codes[floored] == 1) & (scaled[floored] > 0)).all()) and (signed is False or not floored.any())
        assert torch.equal(quant8.dequantize(codes, absmax, qmap), qu.dequant_with_qmap(codes, qmap, scale))


def test_partial_last_block_and_nan_block():
    qmap = torch.tensor(quant8.dynamic_map(True))
    x = torch.linspace(-3, 2, 300)
    x[10] = float("nan")
    codes, absmax = torch.empty(300, dtype=torch.uint8), torch.empty(2)
    quant8.quantize_(x, codes, absmax, qmap)
    assert torch.isnan(absmax[0]) and absmax[1] == x[256:].abs().max()
    assert (codes[:256] == 0).all()  # NaN / NaN and x / NaN: no threshold passed
    back = quant8.dequantize(codes, absmax, qmap)
    assert back[299] == 2.0  # the block's largest value is exact (code of 1.0)
    assert torch.allclose(back[256:], x[256:], rtol=0.05, atol=0.02)


def test_format_sizes():
    assert quant8.num_blocks(0) == 0 and quant8.num_blocks(256) == 1 and quant8.num_blocks(257) == 2
    assert not quant8.quantized(4095) and quant8.quantized(4096)
    assert quant8.qmaps((True, False)).shape == (2, 2, 256)
