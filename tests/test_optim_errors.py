"""Clear errors, and the non-finite gradient guard: nothing is written when a gradient is NaN/inf."""
import pytest
import torch

from cpl_kernels import CPLAdam, CPLAdamW, CPLSGD, MaskedAdamW


def named_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))


@pytest.mark.parametrize("cls", [CPLAdamW, CPLAdam, CPLSGD, MaskedAdamW])
def test_non_finite_gradient_raises_before_any_change(cls):
    """check_finite="raise": a pre-pass refuses the whole step."""
    model = named_model()
    kw = dict(masks=[torch.ones_like(p, dtype=torch.bool) for p in model.parameters()]) if cls is MaskedAdamW else {}
    opt = cls(model.named_parameters(), lr=0.1, check_finite="raise", **kw)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()  # state exists
    params = [p.detach().clone() for p in model.parameters()]
    state = [(st, k, v.clone()) for st in opt.state.values() for k, v in st.items()]
    model(torch.randn(4, 6)).sum().backward()
    model[1].bias.grad[1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"'1\.bias'.*nothing was updated"):
        opt.step()
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p.detach(), before)  # including layers stepped before the bad one in order
    assert all(torch.equal(st[k], before) for st, k, before in state)
    model[1].bias.grad[1] = float("inf")
    with pytest.raises(FloatingPointError):
        opt.step()
    opt.param_groups[0]["check_finite"] = False  # opting out: torch's behaviour, NaN propagates
    opt.step()
    assert not model[1].bias.detach()[1].isfinite()


def test_sparse_gradient_names_the_parameter():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = CPLAdamW(emb.named_parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients.*'weight'"):
        opt.step()
    with pytest.raises(RuntimeError, match="sparse reference gradient"):
        opt.set_reference_from_grads()


def test_reference_from_a_different_model_names_the_parameter():
    model = named_model()
    opt = CPLAdamW(model.named_parameters())
    other = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    with pytest.raises(ValueError, match=r"parameter '1\.weight' has 20 elements but the parameter has 15"):
        opt.set_reference_from_grads([torch.randn(p.shape) for p in other.parameters()])
    with pytest.raises(ValueError, match="got 3 gradients for 4 parameters"):
        opt.set_reference_from_grads([torch.randn(1)] * 3)
    # a checkpoint whose codes were built for another model
    other_opt = CPLAdamW(other.parameters())
    for p in other.parameters():
        p.grad = torch.randn(p.shape)
    other_opt.set_reference_from_grads()
    other_opt.step()
    sd = other_opt.state_dict()
    sd["state"] = {}  # only the codes disagree in size (for '1.weight': 20 vs 15 elements)
    sd["cpl_raw_state"]["cpl_codes"] = {k: v for k, v in sd["cpl_raw_state"]["cpl_codes"].items() if k == 2}
    with pytest.raises(ValueError, match=r"parameter 2 had shape \(4, 5\) but parameter '1\.weight' has "
                                         r"shape \(3, 5\).*different model"):
        opt.load_state_dict(sd)
    del sd["cpl_param_shapes"]  # a checkpoint without recorded shapes: the codes' size still tells
    with pytest.raises(ValueError, match=r"sign codes for parameter '1\.weight'.*different model"):
        opt.load_state_dict(sd)


def test_reference_by_name_and_param_mappings():
    model = named_model()
    opt = CPLSGD(model.named_parameters(), lr=0.1)
    grads = {"0.weight": torch.ones(5, 6), model[1].bias: -torch.ones(3)}
    opt.set_reference_from_grads(grads)
    keyed = {opt.param_name(p): "cpl_codes" in opt.state.get(p, {}) for p in model.parameters()}
    assert keyed == {"'0.weight'": True, "'0.bias'": False, "'1.weight'": False, "'1.bias'": True}


@pytest.mark.parametrize("flag", ["amsgrad", "maximize", "capturable", "differentiable"])
def test_unsupported_torch_options_are_refused(flag):
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
        CPLAdamW(p, **{flag: True})
    CPLAdamW(p, foreach=True, fused=True)  # implementation choices: accepted, the step is fused anyway


def test_bad_hyperparameters_and_criterion():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="criterion must be one of"):
        CPLAdamW(p, criterion="sign")
    with pytest.raises(ValueError, match="learning rate"):
        CPLSGD(p, lr=-1.0)
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        CPLAdam(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Nesterov"):
        CPLSGD(p, nesterov=True)


def test_loading_a_torch_amsgrad_checkpoint_is_refused():
    p = torch.nn.Parameter(torch.randn(3))
    theirs = torch.optim.AdamW([p], amsgrad=True)
    p.grad = torch.randn(3)
    theirs.step()
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        CPLAdamW([p]).load_state_dict(theirs.state_dict())
