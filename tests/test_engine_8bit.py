"""The step engine's 8-bit blockwise state format (cpl::cpl_step_8bit_, cpl_kernels/quant8.py) on
every backend against the reference, bit for bit on CPU (codes, absmax, params, counts); the
reference's quantization against torchao's own functions; non-finite gradients, GradScaler,
found_inf and argument errors."""
import pytest
import torch

from cpl_kernels import engine, kinds, quant8, reference as ref, reference_step
from test_engine import CASES, RULES, case_id, rule_id
from tolerances import PARAM_DTYPES

# Sizes: below one block, a partial last block, whole blocks, a partial batch, several segments
# (the C++ engine cuts tensors into 65536-element segments).
SIZES = [1, 255, 256, 257, 1000, 4096, 70000]
TRITON_SIZES = [1, 257, 1000]


def signed_of(kind: str) -> tuple[bool, ...]:
    return (True, False) if kind in ("adam", "adamw") else (True,)


def make_state(n, kind, hyper, gen):
    """8-bit state of random fp32 values (m signed, v positive), quantized by the reference."""
    slots = kinds.state_slots(kinds.KINDS[kind], hyper)
    maps = quant8.qmaps(signed_of(kind))
    q, a = [[], []], [[], []]
    for k in range(slots):
        x = torch.randn(n, generator=gen).mul_(0.1)
        if k == 1:
            x = x.abs_()
        codes = torch.empty(n, dtype=torch.uint8)
        absmax = torch.empty(quant8.num_blocks(n))
        quant8.quantize_(x, codes, absmax, maps[k, 0])
        q[k].append(codes)
        a[k].append(absmax)
    return q, a, maps


def inputs(n, dtype, kind, hyper, seed, nonfinite=False):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen).to(dtype)
    g = torch.randn(n, generator=gen).to(dtype)
    if nonfinite and n > 3:
        g[1], g[n // 2], g[-1] = float("nan"), float("inf"), float("-inf")
    r = torch.randn(n, generator=gen)
    r[torch.randint(0, n, (max(n // 5, 1),), generator=gen)] = 0.0
    codes = ref.pack_signs_(r, torch.empty(ref.num_code_words(n), dtype=torch.int32))
    q, a, maps = make_state(n, kind, hyper, gen)
    return p, g, q, a, maps, codes


def to(ts, device):
    return [t.clone().to(device) for t in ts]


def run_both(device, kind, hyper, n, dtype, rule, steps=(1, 2, 7), nonfinite=False, grad_scale=None):
    criterion, strict, with_codes = rule
    p, g, q, a, maps, codes = inputs(n, dtype, kind, hyper, seed=n, nonfinite=nonfinite)
    codes = codes if with_codes else None
    mine = dict(p=p.to(device), q=[to(x, device) for x in q], a=[to(x, device) for x in a])
    theirs = dict(p=p.clone(), q=[to(x, "cpu") for x in q], a=[to(x, "cpu") for x in a])
    for step in steps:
        scale = None if grad_scale is None else torch.tensor(grad_scale)
        got = engine.cpl_step_8bit_(
            [mine["p"]], [g.to(device)], mine["q"][0], mine["a"][0], mine["q"][1], mine["a"][1],
            maps.to(device), [None if codes is None else codes.to(device)], kind, step, 0.05, hyper,
            criterion, strict, True, None if scale is None else scale.to(device), None)
        want = reference_step.cpl_step_8bit_(
            [theirs["p"]], [g], theirs["q"][0], theirs["a"][0], theirs["q"][1], theirs["a"][1], maps,
            [codes], kind, float(step), 0.05, hyper, criterion, strict, True, scale, None)
        yield step, got.cpu(), want, mine, theirs


def assert_same(mine, theirs, msg):
    assert torch.equal(mine["p"].cpu(), theirs["p"]), msg
    for k in range(2):
        for x, y in zip(mine["q"][k], theirs["q"][k]):
            assert torch.equal(x.cpu(), y), f"{msg} codes of slot {k}: {(x.cpu() != y).sum()} differ"
        for x, y in zip(mine["a"][k], theirs["a"][k]):
            assert torch.equal(x.cpu(), y), f"{msg} absmax of slot {k}"


@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("rule", RULES, ids=rule_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_8bit_engine_matches_reference(backend, case, rule, dtype):
    device, name = backend
    kind, hyper = case
    sizes = TRITON_SIZES if name == "triton" else SIZES
    if name == "triton" and (dtype != torch.float32 or rule != RULES[2]):
        sizes = sizes[1:2]  # the interpreter runs at Python speed: one size for the other combinations
    for n in sizes:
        for step, got, want, mine, theirs in run_both(device, kind, hyper, n, dtype, rule):
            msg = f"{name} n={n} step={step}"
            assert torch.equal(got, want), msg
            if device == "cpu":  # fp32 math, one rounding per operation (docs/design.md section 4)
                assert_same(mine, theirs, msg)
            else:  # GPU: ulp-level differences may move a value across a code threshold
                torch.testing.assert_close(mine["p"].cpu().float(), theirs["p"].float(), rtol=1e-5, atol=1e-6)
                for k in range(2):
                    for x, y in zip(mine["q"][k], theirs["q"][k]):
                        assert (x.cpu().int() - y.int()).abs().max() <= 1, msg


@pytest.mark.parametrize("case", CASES[:1], ids=case_id)
def test_nonfinite_gradients_keep_their_state_values(backend, case):
    """A non-finite gradient element: param untouched; its state keeps its dequantized value
    through requantization (the block's absmax is unchanged here, so its code is too)."""
    device, name = backend
    kind, hyper = case
    n = 1000
    p0, _, q0, a0, maps, _ = inputs(n, torch.float32, kind, hyper, seed=n, nonfinite=True)
    for step, got, want, mine, theirs in run_both(device, kind, hyper, n, torch.float32,
                                                  ("gradient", True, True), steps=(1,), nonfinite=True):
        assert torch.equal(got, want)
        assert got[1, 0] == 3
        assert_same(mine, theirs, name)
        bad = torch.tensor([1, n // 2, n - 1])
        assert torch.equal(mine["p"].cpu()[bad], p0[bad])
        for k in range(2):
            before = quant8.dequantize(q0[k][0], a0[k][0], maps[k, 0])[bad]
            after = quant8.dequantize(mine["q"][k][0].cpu(), mine["a"][k][0].cpu(), maps[k, 0])[bad]
            # Requantized under the block's new absmax: within one code step of the old value.
            torch.testing.assert_close(after, before, rtol=0.05, atol=1e-3 * float(a0[k][0].max()))


def test_grad_scale_and_found_inf(backend):
    device, name = backend
    kind, hyper = CASES[0]
    n = 1000
    for step, got, want, mine, theirs in run_both(device, kind, hyper, n, torch.float32, RULES[2], steps=(1,),
                                                  grad_scale=1024.0):
        assert torch.equal(got, want)
        assert_same(mine, theirs, name)
    p, g, q, a, maps, codes = inputs(n, torch.float32, kind, hyper, seed=5)
    before = [p.clone()] + [t.clone() for t in q[0] + q[1] + a[0] + a[1]]
    counts = engine.cpl_step_8bit_([p], [g], q[0], a[0], q[1], a[1], maps, [codes], kind, 1, 0.05, hyper,
                                   found_inf=torch.tensor(1.0))
    assert counts.sum() == 0
    assert all(torch.equal(x, y) for x, y in zip([p] + q[0] + q[1] + a[0] + a[1], before))


def test_several_tensors_in_one_call(backend):
    device, name = backend
    kind, hyper = CASES[0]
    sizes = [300, 17, 5000] if name != "triton" else [300, 17]
    ins = [inputs(n, torch.float32, kind, hyper, seed=n) for n in sizes]
    mine = [[t.clone().to(device) if isinstance(t, torch.Tensor) else [[x.clone().to(device) for x in s] for s in t]
             for t in x] for x in ins]
    got = engine.cpl_step_8bit_([x[0] for x in mine], [x[1] for x in mine], [x[2][0][0] for x in mine],
                                [x[3][0][0] for x in mine], [x[2][1][0] for x in mine], [x[3][1][0] for x in mine],
                                ins[0][4].to(device), [x[5] for x in mine], kind, 3, 0.05, hyper)
    for i, (p, g, q, a, maps, codes) in enumerate(ins):
        want = reference_step.cpl_step_8bit_([p], [g], q[0], a[0], q[1], a[1], maps, [codes], kind, 3.0, 0.05,
                                             hyper, "update", True, True, None, None)
        assert torch.equal(got[:, i].cpu(), want[:, 0])
        if device == "cpu":
            assert torch.equal(mine[i][0].cpu(), p)
            assert torch.equal(mine[i][2][0][0].cpu(), q[0][0]) and torch.equal(mine[i][3][1][0].cpu(), a[1][0])


@pytest.mark.parametrize("bad, match", [
    (dict(state1=[torch.zeros(300, dtype=torch.float32)]), r"'state1\[0\]' has dtype float32; expected .*uint8"),
    (dict(absmax1=[torch.zeros(1)]), r"'absmax1\[0\]' has 1 elements; expected 2"),
    (dict(qmaps=torch.zeros(512)), r"'qmaps' has 512 elements; expected 1024"),
    (dict(state2=[]), r"'state2' has 0 entries but 'params' has 1"),
    (dict(kind="adamax"), r"'kind' must be one of"),
])
@pytest.mark.parametrize("via", ["engine", "native"])
def test_errors_name_the_argument_and_write_nothing(bad, match, via):
    if via == "native" and not hasattr(torch.ops.cpl, "cpl_step_8bit_"):
        pytest.skip("native library without cpl_step_8bit_")
    p, g, q, a, maps, codes = inputs(300, torch.float32, "adamw", [0.9, 0.999, 1e-8, 0.0], seed=1)
    args = dict(params=[p], grads=[g], state1=q[0], absmax1=a[0], state2=q[1], absmax2=a[1], qmaps=maps,
                codes=[codes], kind="adamw", step=1, lr=0.1, hyper=[0.9, 0.999, 1e-8, 0.0])
    args.update(bad)
    before = [t.clone() for t in [p] + q[0] + q[1] + a[0] + a[1]]
    with pytest.raises(ValueError, match=match):
        if via == "engine":
            engine.cpl_step_8bit_(**args)
        else:
            torch.ops.cpl.cpl_step_8bit_(
                args["params"], args["grads"], args["state1"], args["absmax1"], args["state2"], args["absmax2"],
                args["qmaps"], args["codes"], args["kind"], torch.tensor(1.0, dtype=torch.float64),
                torch.tensor(0.1, dtype=torch.float64), args["hyper"], "update", True, True, None, None)
    assert all(torch.equal(x, y) for x, y in zip([p] + q[0] + q[1] + a[0] + a[1], before))


def test_v_floor_is_the_same_on_every_backend(backend):
    """v spanning 12 decades inside each block (and gradients 1e-7 of the others on a third of the
    elements), so many v fall under the unsigned map's first torchao threshold: every backend
    applies the floor (quant8.rule: code 1, not 0, for a positive v) exactly as the reference."""
    device, name = backend
    kind, hyper = next(c for c in CASES if c[0] == "adamw")
    n = 4096 + 257
    gen = torch.Generator().manual_seed(11)
    p, g, q, a, maps, codes = inputs(n, torch.float32, kind, hyper, seed=3)
    g[::3] *= 1e-7
    v = torch.rand(n, generator=gen) * torch.logspace(-12, 0, n)[torch.randperm(n, generator=gen)]
    quant8.quantize_(v, q[1][0], a[1][0], maps[1, 0])
    y = v / a[1][0].repeat_interleave(quant8.BLOCK)[:n]
    floored = (y >= quant8.FLOOR) & (quant8._search(y, maps[1, 0]) == 0)
    assert int(floored.sum()) > 100 and bool((q[1][0][floored] == 1).all())
    mine = dict(p=p.to(device), q=[to(x, device) for x in q], a=[to(x, device) for x in a])
    theirs = dict(p=p.clone(), q=[to(x, "cpu") for x in q], a=[to(x, "cpu") for x in a])
    for step in (1, 2, 3):
        args = ("gradient", True, True, None, None)
        got = engine.cpl_step_8bit_([mine["p"]], [g.to(device)], mine["q"][0], mine["a"][0], mine["q"][1],
                                    mine["a"][1], maps.to(device), [codes.to(device)], kind, step, 0.05, hyper, *args)
        want = reference_step.cpl_step_8bit_([theirs["p"]], [g], theirs["q"][0], theirs["a"][0], theirs["q"][1],
                                             theirs["a"][1], maps, [codes], kind, float(step), 0.05, hyper, *args)
        assert torch.equal(got.cpu(), want), f"{name} step {step}"
        v_codes = theirs["q"][1][0]
        y = quant8.dequantize(v_codes, theirs["a"][1][0], maps[1, 0])
        assert bool((y > 0).all()), "a positive v read back as 0"
        if device == "cpu":
            assert_same(mine, theirs, f"{name} step {step}")
        else:
            assert (mine["q"][1][0].cpu().int() - v_codes.int()).abs().max() <= 1
