"""cpl::cpl_step_'s CPU kernel called directly (torch.ops.cpl.cpl_step_, bypassing cpl_kernels.engine's
Python validation): it validates every entry of every list before writing anything (docs/design.md
section 3), and one call over a mixed list (dtypes, codes or none, sizes across its parallel segments,
empty tensors) equals the reference tensor by tensor."""
import pytest
import torch

from cpl_kernels import _backend, kinds, reference as ref, reference_step

pytestmark = pytest.mark.skipif(not _backend.has_native_kernel("CPU")
                                or not torch._C._dispatch_has_kernel_for_dispatch_key("cpl::cpl_step_", "CPU"),
                                reason="native cpl_step_ not built")

SIZES = [10, 20, 33, 40, 17]  # a bad entry goes at index 3 (late: entries 0-2 would be written first)


def make(kind="adamw", hyper=(0.9, 0.999, 1e-8, 0.1), sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    slots = kinds.state_slots(kinds.KINDS[kind], hyper)
    params = [torch.randn(n, generator=g) for n in sizes]
    args = dict(
        params=params, grads=[torch.randn(n, generator=g) for n in sizes],
        state1=[torch.rand(n, generator=g) for n in sizes] if slots >= 1 else [],
        state2=[torch.rand(n, generator=g) for n in sizes] if slots >= 2 else [],
        codes=[ref.pack_signs_(torch.randn(n, generator=g), torch.empty(ref.num_code_words(n), dtype=torch.int32))
               for n in sizes],
        kind=kind, step=torch.tensor(3.0, dtype=torch.float64), lr=torch.tensor(0.05, dtype=torch.float64),
        hyper=list(hyper), criterion="update", strict=True, skip_nonfinite=True, grad_scale=None, found_inf=None)
    return args


def call(a):
    return torch.ops.cpl.cpl_step_(a["params"], a["grads"], a["state1"], a["state2"], a["codes"], a["kind"],
                                   a["step"], a["lr"], a["hyper"], a["criterion"], a["strict"],
                                   a["skip_nonfinite"], a["grad_scale"], a["found_inf"])


def written_tensors(a):
    return a["params"] + a["state1"] + a["state2"]


def replace(lst, i, t):
    lst = list(lst)
    lst[i] = t
    return lst


BAD = [
    ("state1[3] size", lambda a: a.update(state1=replace(a["state1"], 3, torch.zeros(39))),
     r"argument 'state1\[3\]' has 39 elements; expected 40"),
    ("state2[3] dtype", lambda a: a.update(state2=replace(a["state2"], 3, torch.zeros(40, dtype=torch.float64))),
     r"argument 'state2\[3\]' has dtype float64; expected float32"),
    ("grads[3] dtype", lambda a: a.update(grads=replace(a["grads"], 3, torch.zeros(40, dtype=torch.bfloat16))),
     r"argument 'grads\[3\]' has dtype bfloat16 and shape \(40,\) but 'params\[3\]' has float32, \(40,\); "
     r"they must match"),
    ("grads[3] shape", lambda a: a.update(grads=replace(a["grads"], 3, torch.zeros(4, 10))),
     r"argument 'grads\[3\]' has dtype float32 and shape \(4, 10\)"),
    ("params[3] dtype", lambda a: a.update(params=replace(a["params"], 3, torch.zeros(40, dtype=torch.float64))),
     r"argument 'params\[3\]' has dtype float64; expected one of: float32, bfloat16, float16"),
    ("params[3] strided", lambda a: a.update(params=replace(a["params"], 3, torch.zeros(80)[::2])),
     r"argument 'params\[3\]' must be contiguous \(shape \(40,\), stride \[2\]\)"),
    ("codes[3] words", lambda a: a.update(codes=replace(a["codes"], 3, torch.zeros(2, dtype=torch.int32))),
     r"argument 'codes\[3\]' holds 2 int32 words but 40 elements need 3"),
    ("codes[3] dtype", lambda a: a.update(codes=replace(a["codes"], 3, torch.zeros(3, dtype=torch.int64))),
     r"argument 'codes\[3\]' has dtype int64; expected int32"),
    ("codes[4] words", lambda a: a.update(codes=replace(a["codes"], 4, torch.zeros(1, dtype=torch.int32))),
     r"argument 'codes\[4\]' holds 1 int32 words but 17 elements need 2"),
    ("state2 list", lambda a: a.update(state2=a["state2"][:4]), r"argument 'state2' has 4 entries but 'params' has 5"),
    ("grads list", lambda a: a.update(grads=a["grads"][:4]), r"argument 'grads' has 4 entries but 'params' has 5"),
    ("codes list", lambda a: a.update(codes=a["codes"][:2]), r"argument 'codes' has 2 entries but 'params' has 5"),
    ("kind", lambda a: a.update(kind="adamax"),
     r"argument 'kind' must be one of \('adam', 'adamw', 'sgd', 'lion', 'mofo'\), got 'adamax'"),
    ("hyper count", lambda a: a.update(hyper=[0.9, 0.999, 1e-8]),
     r"argument 'hyper' for kind 'adamw' holds 3 values; expected 4: beta1, beta2, eps, weight_decay"),
    ("beta1", lambda a: a.update(hyper=[1.0, 0.999, 1e-8, 0.0]), r"hyperparameter 'beta1' must be in \[0, 1\)"),
    ("eps nan", lambda a: a.update(hyper=[0.9, 0.999, float("nan"), 0.0]), r"hyperparameter 'eps' must be a finite"),
    ("criterion", lambda a: a.update(criterion="sign"), r"argument 'criterion' must be one of"),
    ("step", lambda a: a.update(step=torch.tensor(0.0)), r"argument 'step' must be a finite number >= 1"),
    ("lr", lambda a: a.update(lr=torch.tensor(-1.0)), r"argument 'lr' must be a finite number >= 0"),
    ("lr two values", lambda a: a.update(lr=torch.tensor([0.1, 0.2])), r"argument 'lr' must hold one value"),
    ("grad_scale int", lambda a: a.update(grad_scale=torch.tensor(2)), r"argument 'grad_scale' must be a one-element"),
]


@pytest.mark.parametrize("change, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_native_validation_names_the_entry_and_writes_nothing(change, match):
    a = make()
    tensors = written_tensors(a)  # the originals: entries 0-2 stay in the call's lists
    before = [t.clone() for t in tensors]
    change(a)
    with pytest.raises(ValueError, match=match):
        call(a)
    assert all(torch.equal(x, y) for x, y in zip(tensors, before))


@pytest.mark.parametrize("kind, hyper, change, match", [
    ("sgd", (0.0, 0.0, 0.0, 0.0, 0.0), lambda a: a.update(state1=[torch.zeros(n) for n in SIZES]),
     r"argument 'state1' has 5 entries but kind 'sgd' with these hyperparameters uses 0 state slot"),
    ("sgd", (0.9, 0.1, 0.0, 1.0, 0.0), lambda a: None, r"nesterov needs momentum > 0 and dampening == 0"),
    ("sgd", (0.9, 0.0, 0.0, 0.5, 0.0), lambda a: None, r"hyperparameter 'nesterov' must be 0 or 1"),
    ("sgd", (0.9, 0.0, 0.0, 0.0, 0.0), lambda a: a.update(state1=replace(a["state1"], 4, torch.zeros(16))),
     r"argument 'state1\[4\]' has 16 elements; expected 17"),
    ("lion", (0.9, 0.99, -0.1), lambda a: None, r"hyperparameter 'weight_decay' must be >= 0"),
    ("lion", (0.9, 0.99, 0.0), lambda a: a.update(state1=a["state1"][:3]),
     r"argument 'state1' has 3 entries but 'params' has 5"),
    ("lion", (0.9, 0.99, 0.0), lambda a: a.update(step=torch.tensor(float("inf"))),
     r"argument 'step' must be a finite number >= 0"),
])
def test_native_validation_per_kind(kind, hyper, change, match):
    a = make(kind, hyper)
    tensors = written_tensors(a)
    before = [t.clone() for t in tensors]
    change(a)
    with pytest.raises(ValueError, match=match):
        call(a)
    assert all(torch.equal(x, y) for x, y in zip(tensors, before))


def test_found_inf_writes_nothing_and_counts_nothing():
    a = make()
    a["grads"][2][5] = float("nan")
    tensors = written_tensors(a)
    before = [t.clone() for t in tensors]
    a["grad_scale"], a["found_inf"] = torch.tensor(4.0), torch.tensor(1.0)
    counts = call(a)
    assert counts.shape == (2, len(SIZES)) and counts.dtype == torch.int64 and counts.sum() == 0
    assert all(torch.equal(x, y) for x, y in zip(tensors, before))


def test_empty_lists():
    out = torch.ops.cpl.cpl_step_([], [], [], [], [], "lion", torch.tensor(1.0), torch.tensor(0.1), [0.9, 0.99, 0.0],
                                  "update", True, True, None, None)
    assert out.shape == (2, 0) and out.dtype == torch.int64


# One call over a mixed list: dtypes, codes or none, sizes across the 64K-element segments and the
# task packing (many small tensors around large ones), empty tensors; non-finite gradients.
MIXED = [(0, torch.float32, True), (5, torch.bfloat16, True), (65536 + 17, torch.float32, True),
         (512, torch.float16, False), (512, torch.float32, True), (3 * 65536 - 16, torch.bfloat16, True),
         (1, torch.float32, True), (100_003, torch.float32, False), (16, torch.float16, True)] + \
        [(300 + k, torch.float32, k % 2 == 0) for k in range(40)]


@pytest.mark.parametrize("kind, hyper", [("adamw", (0.9, 0.999, 1e-3, 0.1)), ("adam", (0.9, 0.99, 1e-8, 0.05)),
                                         ("sgd", (0.9, 0.1, 0.01, 0.0, 0.0)), ("sgd", (0.9, 0.0, 0.0, 1.0, 1.0)),
                                         ("sgd", (0.0, 0.0, 0.0, 0.0, 0.0)), ("lion", (0.9, 0.99, 0.1))])
@pytest.mark.parametrize("rule", [("update", True), ("gradient", True), ("gradient", False)])
@pytest.mark.parametrize("scaled", [False, True])
def test_one_call_over_a_mixed_list_matches_the_reference(kind, hyper, rule, scaled):
    gen = torch.Generator().manual_seed(7)
    slots = kinds.state_slots(kinds.KINDS[kind], hyper)
    params, grads, s1, s2, codes = [], [], [], [], []
    for n, dtype, with_codes in MIXED:
        params.append(torch.randn(n, generator=gen).to(dtype))
        g = torch.randn(n, generator=gen)
        if n > 100:
            g[torch.randint(0, n, (5,), generator=gen)] = float("nan")
            g[n // 3] = float("-inf")
        grads.append((g * (256.0 if scaled else 1.0)).to(dtype))
        if slots >= 1:
            s1.append(torch.randn(n, generator=gen).mul_(0.1))
        if slots >= 2:
            s2.append(torch.rand(n, generator=gen).mul_(0.1))
        r = torch.randn(n, generator=gen)
        r[torch.rand(n, generator=gen) < 0.1] = 0
        codes.append(ref.pack_signs_(r, torch.empty(ref.num_code_words(n), dtype=torch.int32)) if with_codes else None)
    clone = lambda ts: [t.clone() for t in ts]  # noqa: E731
    mine = (clone(params), clone(s1), clone(s2))
    theirs = (clone(params), clone(s1), clone(s2))
    scale = torch.tensor(256.0) if scaled else None
    for step in (1, 2):
        got = torch.ops.cpl.cpl_step_(mine[0], grads, mine[1], mine[2], codes, kind, torch.tensor(float(step)),
                                      torch.tensor(0.05), list(hyper), rule[0], rule[1], True, scale, None)
        want = reference_step.cpl_step_(theirs[0], grads, theirs[1], theirs[2], codes, kind, float(step), 0.05,
                                        list(hyper), rule[0], rule[1], True, scale, None)
        assert torch.equal(got, want)
        assert got[1].sum() > 0
        for a, b in zip(mine[0] + mine[1] + mine[2], theirs[0] + theirs[1] + theirs[2]):
            assert torch.equal(a, b)
