"""Drop-in safety: every error leaves params, state and codes exactly as they were; checkpoints from
another model or optimizer kind are refused by name (no silent fallback: test_optim_fallbacks.py)."""
import copy
import inspect
import io
import pickle
import warnings

import pytest
import torch

from cpl_kernels import CPLAdam, CPLAdamW, CPLSGD, MaskedAdamW

CLASSES = [CPLAdamW, CPLAdam, CPLSGD, MaskedAdamW]


def model_of(seed=0, out=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, out))


def make(cls, params, **kw):
    params = list(params)
    if cls is MaskedAdamW:
        gen = torch.Generator().manual_seed(3)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        tensors = [p[1] if isinstance(p, tuple) else p for g in groups for p in g["params"]]
        kw.setdefault("masks", [torch.rand(t.shape, generator=gen) < 0.6 for t in tensors])
    if cls is CPLSGD:
        kw.setdefault("momentum", 0.9)
    return cls(params, lr=0.05, **kw)


def backward(model, seed=1):
    model.zero_grad()
    gen = torch.Generator().manual_seed(seed)
    model(torch.randn(4, 6, generator=gen)).pow(2).sum().backward()


def snapshot(model, opt):
    """Bit-exact copies of every parameter and every state tensor (codes included)."""
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
             for p, st in opt.state.items()}
    return params, state


def assert_unchanged(model, opt, snap):
    params, state = snap
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p.detach(), before)
    assert {id(p) for p in opt.state} == set(state)
    for p, st in opt.state.items():
        assert st.keys() == state[id(p)].keys()
        for k, v in st.items():
            assert torch.equal(v, state[id(p)][k]) if isinstance(v, torch.Tensor) else v == state[id(p)][k]


def with_reference(opt, model, seed=7):
    if isinstance(opt, MaskedAdamW):
        return
    gen = torch.Generator().manual_seed(seed)
    opt.set_reference_from_grads([torch.randn(p.shape, generator=gen) for p in model.parameters()])


# ---- all or nothing ----------------------------------------------------------------------------

@pytest.mark.parametrize("cls", CLASSES)
def test_a_bad_parameter_in_a_later_group_changes_nothing(cls):
    model = model_of()
    opt = make(cls, [{"params": list(model[0].parameters())}, {"params": list(model[1].parameters())}])
    with_reference(opt, model)
    backward(model)
    opt.step()
    backward(model, seed=2)
    model[1].bias.data = model[1].bias.data.double()
    model[1].bias.grad = model[1].bias.grad.double()
    snap = snapshot(model, opt)
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[1\].*float64"):
        opt.step()
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("cls", CLASSES)
def test_a_negative_step_count_changes_nothing(cls):
    model = model_of()
    opt = make(cls, model.named_parameters())
    with_reference(opt, model)
    backward(model)
    opt.step()
    backward(model, seed=2)
    last = list(model.parameters())[-1]
    if "step" not in opt.state[last]:  # plain SGD keeps no step: nothing to corrupt
        pytest.skip("no step count")
    opt.state[last]["step"] = torch.tensor(-5.0)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"'1\.bias' has step count -5\.0"):
        opt.step()
    assert_unchanged(model, opt, snap)
    sd = copy.deepcopy(opt.state_dict())
    opt.state[last]["step"] = torch.tensor(1.0)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match="step count -5"):
        opt.load_state_dict(sd)
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("cls", [CPLAdamW, CPLSGD])
def test_a_tampered_checkpoint_changes_nothing(cls):
    model = model_of()
    opt = make(cls, model.named_parameters())
    with_reference(opt, model)
    backward(model)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["cpl_raw_state"]["cpl_codes"][3] = sd["cpl_raw_state"]["cpl_codes"][3][:-1].clone()
    with_reference(opt, model, seed=9)  # the live codes differ from the checkpoint's
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"sign codes for parameter '1\.bias'"):
        opt.load_state_dict(sd)
    assert_unchanged(model, opt, snap)


def test_cross_class_loads_with_masked_adamw_change_nothing():
    model = model_of()
    masked = make(MaskedAdamW, model.named_parameters())
    cpl = make(CPLAdamW, model.named_parameters())
    with_reference(cpl, model)
    backward(model)
    masked.step()
    cpl.step()
    for target, source, match in ((cpl, masked, "'mask_words' state, which CPLAdamW does not use"),
                                  (masked, cpl, "'cpl_codes' state, which MaskedAdamW does not use")):
        snap = snapshot(model, target)
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(copy.deepcopy(source.state_dict()))
        assert_unchanged(model, target, snap)


def test_a_bad_reference_entry_changes_no_codes_and_names_the_parameter():
    model = model_of()
    opt = make(CPLAdamW, model.named_parameters())
    with_reference(opt, model)
    snap = snapshot(model, opt)
    grads = [torch.randn(p.shape) for p in model.parameters()]
    grads[2] = torch.ones(p.shape, dtype=torch.int64) if (p := list(model.parameters())[2]) is not None else None
    with pytest.raises(TypeError, match=r"parameter '1\.weight' has dtype torch\.int64"):
        opt.set_reference_from_grads(grads)
    grads[2] = torch.randn(7)
    with pytest.raises(ValueError, match=r"'1\.weight' has 7 elements but the parameter has 15"):
        opt.set_reference_from_grads(grads)
    assert_unchanged(model, opt, snap)


# ---- torch.optim parity --------------------------------------------------------------------------

def run_side_by_side(make_ours, make_theirs, params_ours, params_theirs, steps=12):
    ours, theirs = make_ours(params_ours), make_theirs(params_theirs)
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        for a, b in zip(params_ours, params_theirs):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone().to(memory_format=torch.preserve_format), g.clone()
        ours.step()
        theirs.step()
    return ours, theirs


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided_slice"])
def test_non_contiguous_parameters_step_like_torch(layout):
    torch.manual_seed(0)
    if layout == "channels_last":
        base = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    elif layout == "transposed":
        base = torch.randn(7, 9).t()
    else:
        base = torch.randn(8, 12)[:, ::2]
    ours = [torch.nn.Parameter(base.clone(memory_format=torch.preserve_format) if layout != "strided_slice"
                               else torch.randn(8, 12)[:, ::2].copy_(base))]
    theirs = [torch.nn.Parameter(base.clone())]
    assert ours[0].is_contiguous() is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_side_by_side(lambda p: CPLAdamW(p, lr=0.05), lambda p: torch.optim.AdamW(p, lr=0.05), ours, theirs)
    torch.testing.assert_close(ours[0].detach(), theirs[0].detach(), rtol=1e-5, atol=1e-6)


def test_codes_follow_the_memory_order_of_a_transposed_parameter():
    """CPL on a transposed view equals CPL on the same values stored contiguously."""
    torch.manual_seed(0)
    values, ref = torch.randn(9, 7), torch.randn(9, 7)
    t = torch.nn.Parameter(values.t().contiguous().t())  # (9, 7) logical, column-major in memory
    c = torch.nn.Parameter(values.clone())
    opts = [CPLAdamW([t], lr=0.05), CPLAdamW([c], lr=0.05)]
    for opt in opts:
        opt.set_reference_from_grads([ref.clone()])
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        g = torch.randn(9, 7, generator=gen)
        t.grad, c.grad = g.t().contiguous().t(), g.clone()
        for opt in opts:
            opt.step()
        assert opts[0].frozen_counts == opts[1].frozen_counts
    assert torch.equal(t.detach(), c.detach())


@pytest.mark.parametrize("cls", [CPLAdamW, CPLSGD])
def test_bf16_resume_is_bit_exact(cls):
    def run(split):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(300).bfloat16())
        opt = cls([p], lr=0.01, **({"momentum": 0.9} if cls is CPLSGD else {}))
        opt.set_reference_from_grads([torch.randn(300)])
        gen = torch.Generator().manual_seed(1)
        for i in range(8):
            if i == split:
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                opt = cls([p], lr=0.01, **({"momentum": 0.9} if cls is CPLSGD else {}))
                opt.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
            p.grad = torch.randn(300, generator=gen).bfloat16() * 1e-3
            opt.step()
        return p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}

    (p_a, st_a), (p_b, st_b) = run(split=-1), run(split=4)
    assert torch.equal(p_a, p_b)
    assert st_a.keys() == st_b.keys()
    assert all(torch.equal(st_a[k], st_b[k]) for k in st_a)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_counts_and_state(cls, how):
    model = model_of()
    opt = make(cls, model.named_parameters())
    with_reference(opt, model)
    backward(model)
    opt.step()
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    if cls is not MaskedAdamW:
        assert twin.frozen_fraction == opt.frozen_fraction
        assert twin.frozen_counts == opt.frozen_counts and twin.stepped_counts == opt.stepped_counts
    assert "cpl_param_shapes" in twin.state_dict()  # our state_dict hook survives the copy


@pytest.mark.parametrize("cls", CLASSES)
def test_non_parameter_keys_in_state_survive_checkpoints(cls):
    model = model_of()
    opt = make(cls, model.named_parameters())
    backward(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    opt.state["global_step"] = 7
    sd = opt.state_dict()
    assert sd["state"]["global_step"] == 7
    fresh = make(cls, model.named_parameters())
    fresh.load_state_dict(sd)
    assert fresh.state["global_step"] == 7
    assert fresh.state_bytes() == opt.state_bytes()


def test_tensor_hyperparameters_read_like_torch():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"betas\[0\] is a Tensor"):
        CPLAdamW(p, betas=(torch.tensor(0.9), 0.999))
    with pytest.raises(ValueError, match=r"betas\[1\] is a Tensor"):
        CPLAdamW(p, betas=(0.9, torch.tensor(0.999)))
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        CPLAdamW(p, lr=torch.tensor([1e-3, 1e-3]))
    opt = CPLAdamW(p, lr=torch.tensor(0.1))  # a 1-element Tensor lr works, as in torch
    opt.clear_reference()
    p[0].grad = torch.ones(3)
    opt.step()
    assert torch.all(p[0].detach() < 0)


def test_keyword_arguments_are_explicit():
    for cls in (CPLAdamW, CPLAdam, CPLSGD, MaskedAdamW):
        sig = inspect.signature(cls)
        assert sig.parameters["check_finite"].kind is inspect.Parameter.KEYWORD_ONLY
        assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    assert inspect.signature(CPLAdamW).parameters["criterion"].default == "update"


def test_state_dict_post_hooks_see_the_saved_layout():
    model = model_of()
    opt = CPLAdamW(model.named_parameters())
    with_reference(opt, model)
    seen = {}

    def hook(optimizer, sd):
        seen["raw"] = "cpl_raw_state" in sd
        seen["codes_inside"] = any("cpl_codes" in st for st in sd["state"].values())

    opt.register_state_dict_post_hook(hook)
    opt.state_dict()
    assert seen == {"raw": True, "codes_inside": False}


@pytest.mark.parametrize("cls", CLASSES)
def test_fp64_parameters_are_refused_when_added(cls):
    good, bad = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype float64; supported: float32, bfloat16, float16"):
        make(cls, [good, bad])
    opt = make(cls, [good])
    with pytest.raises(TypeError, match="float64"):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", CLASSES)
def test_finite_gradients_whose_sum_overflows_step(cls):
    p = torch.nn.Parameter(torch.zeros(4))
    opt = make(cls, [p])
    p.grad = torch.tensor([3e38, 3e38, 0.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert torch.isfinite(p.detach()).all() and not torch.equal(p.detach(), torch.zeros(4))


# ---- checkpoints from elsewhere --------------------------------------------------------------------

@pytest.mark.parametrize("cls", CLASSES)
def test_state_of_another_shape_is_refused(cls):
    a = [torch.nn.Parameter(torch.randn(4, 6))]
    b = [torch.nn.Parameter(torch.randn(6, 4))]  # same numel, same word counts, other shape
    src, dst = make(cls, a), make(cls, b)
    a[0].grad = torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src.step()
    snap = snapshot(torch.nn.ParameterList(b), dst)
    with pytest.raises(ValueError, match=r"shape \(4, 6\) but parameter .* has shape \(6, 4\)"):
        dst.load_state_dict(src.state_dict())
    sd = src.state_dict()
    del sd["cpl_param_shapes"]  # an exporter that dropped the shapes: the state's own shape tells
    if cls is not MaskedAdamW:
        with pytest.raises(ValueError, match=r"has shape \(4, 6\) but the parameter has shape \(6, 4\)"):
            dst.load_state_dict(sd)
    assert_unchanged(torch.nn.ParameterList(b), dst, snap)


def test_a_checkpoint_from_another_model_names_the_parameter_at_load():
    src_model, dst_model = model_of(out=4), model_of(out=3)
    src, dst = CPLAdamW(src_model.named_parameters()), CPLAdamW(dst_model.named_parameters())
    backward(src_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src.step()
    sd = src.state_dict()
    del sd["cpl_param_shapes"]
    with pytest.raises(ValueError, match=r"'exp_avg' of parameter '1\.weight' has shape \(4, 5\)"):
        dst.load_state_dict(sd)


@pytest.mark.parametrize("src_cls,dst_cls", [(torch.optim.Adam, CPLAdamW), (torch.optim.AdamW, CPLAdam),
                                             (CPLAdam, CPLAdamW), (CPLAdamW, CPLAdam)])
def test_adam_and_adamw_checkpoints_do_not_cross(src_cls, dst_cls):
    p = torch.nn.Parameter(torch.randn(5))
    src = src_cls([p], weight_decay=0.1)
    p.grad = torch.randn(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src.step()
    with pytest.raises(ValueError, match="decoupled_weight_decay=.*load it into"):
        dst_cls([p]).load_state_dict(src.state_dict())


def test_sgd_and_adam_checkpoints_do_not_cross():
    p = torch.nn.Parameter(torch.randn(5))
    src = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn(5)
    src.step()
    with pytest.raises(ValueError, match=r"holds \['momentum_buffer'\], which CPLAdamW does not use"):
        CPLAdamW([p]).load_state_dict(src.state_dict())
