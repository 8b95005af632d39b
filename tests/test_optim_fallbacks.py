"""No silent fallback to plain AdamW: references and masks that match no parameter, name keys on
unnamed parameters, typos and partial coverage are errors or warnings that name what they miss."""
import warnings

import pytest
import torch

from cpl_kernels import CPLAdamW, MaskedAdamW
from test_optim_safety import model_of, backward, snapshot, assert_unchanged, with_reference


def test_name_keys_on_an_unnamed_optimizer_are_an_error():
    model = model_of()
    opt = CPLAdamW(model.parameters())
    with pytest.raises(ValueError, match=r"4 key\(s\) match no parameter.*'0\.weight'.*named_parameters"):
        opt.set_reference_from_grads({n: torch.randn(p.shape) for n, p in model.named_parameters()})
    assert not opt.has_reference


def test_a_typo_key_is_an_error_and_keeps_the_existing_reference():
    model = model_of()
    opt = CPLAdamW(model.named_parameters())
    with_reference(opt, model)
    snap = snapshot(model, opt)
    grads = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    grads["1.wieght"] = grads.pop("1.weight")
    with pytest.raises(ValueError, match=r"1 key\(s\) match no parameter.*'1\.wieght'"):
        opt.set_reference_from_grads(grads)
    assert_unchanged(model, opt, snap)


def test_partial_coverage_warns_with_the_names_left_out():
    model = model_of()
    opt = CPLAdamW(model.named_parameters())
    with pytest.warns(UserWarning, match=r"2 of 4 parameters get no reference.*'0\.bias', '1\.bias'"):
        opt.set_reference_from_grads({"0.weight": torch.randn(5, 6), "1.weight": torch.randn(3, 5)})


def test_masked_adamw_name_keys_on_unnamed_parameters_are_an_error():
    """The issue's case: MaskedAdamW(model.parameters(), masks={name: mask}) used to train every
    element; also the HF Trainer's optimizer_cls_and_kwargs path (param-group dicts, no names)."""
    model = model_of()
    masks = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    groups = [{"params": [p for n, p in model.named_parameters() if "bias" not in n], "weight_decay": 0.1},
              {"params": [p for n, p in model.named_parameters() if "bias" in n], "weight_decay": 0.0}]
    for params in (model.parameters(), groups):
        with pytest.raises(ValueError, match=r"4 mask key\(s\) match no parameter: \['0\.weight', '0\.bias', "
                                             r"'1\.weight', '1\.bias'\].*named_parameters\(\)"):
            MaskedAdamW(params, masks=masks)
    opt = MaskedAdamW(model.parameters(), masks={p: masks[n] for n, p in model.named_parameters()})
    assert opt.active_counts() == [0, 0, 0, 0]  # keyed by tensor, unnamed parameters work
    with pytest.raises(ValueError, match=r"4 mask key\(s\) match no parameter.*named_parameters"):
        opt.update_masks({n: ~m for n, m in masks.items()})
    assert opt.active_counts() == [0, 0, 0, 0]


def test_masked_adamw_typo_keys_are_an_error_at_build_and_update():
    model = model_of()
    masks = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    masks["1.wieght"] = masks.pop("1.weight")
    with pytest.raises(ValueError, match=r"1 mask key\(s\) match no parameter: \['1\.wieght'\]; keys must be"):
        MaskedAdamW(model.named_parameters(), masks=masks)
    with pytest.raises(ValueError, match=r"<tensor \(3, 5\)>"):  # a tensor of another model
        MaskedAdamW(model.named_parameters(), masks={model_of(seed=1)[1].weight: torch.ones(3, 5, dtype=torch.bool)})


def test_masked_adamw_partial_masks_warn_unless_default_is_explicit():
    model = model_of()
    some = {"0.weight": torch.zeros(5, 6, dtype=torch.bool), "1.weight": torch.zeros(3, 5, dtype=torch.bool)}
    with pytest.warns(UserWarning, match=r"2 of 4 parameters have no mask and are trained on all elements: "
                                         r"\[\"'0\.bias'\", \"'1\.bias'\"\].*default='train' or default='freeze'"):
        opt = MaskedAdamW(model.named_parameters(), masks=some)
    assert opt.active_counts() == [0, 5, 0, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explicit: no warning
        train = MaskedAdamW(model.named_parameters(), masks=some, default="train")
        freeze = MaskedAdamW(model.named_parameters(), masks=some, default="freeze")
        aligned = MaskedAdamW(model.named_parameters(), masks=[some["0.weight"], None, None, None])
    assert train.active_counts() == [0, 5, 0, 3] and freeze.active_counts() == [0, 0, 0, 0]
    assert aligned.active_counts() == [0, 5, 15, 3]  # None in a sequence: default "train", as documented
    with pytest.raises(ValueError, match="default must be one of"):
        MaskedAdamW(model.named_parameters(), masks=some, default="keep")


def test_a_transposed_reference_is_an_error():
    p = torch.nn.Parameter(torch.randn(5, 6))
    opt = CPLAdamW([p])
    with pytest.raises(ValueError, match=r"shape \(6, 5\) but the parameter has shape \(5, 6\)"):
        opt.set_reference_from_grads([torch.randn(6, 5)])


def test_a_reference_for_parameters_the_optimizer_does_not_hold_is_an_error():
    model, other = model_of(), model_of(seed=1)
    opt = CPLAdamW(other.parameters())
    with pytest.raises(ValueError, match="4 key"):
        opt.set_reference_from_grads({p: torch.randn(p.shape) for p in model.parameters()})


def test_stepping_without_any_reference_warns_once():
    model = model_of()
    opt = CPLAdamW(model.parameters())
    backward(model)
    with pytest.warns(UserWarning, match="no reference has been set.*plain AdamW"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
        quiet = CPLAdamW(model.parameters())
        quiet.clear_reference()  # running without one, on purpose
        quiet.step()
