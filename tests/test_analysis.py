"""Contribution statistics per tensor and per layer: counts exact, pos_sum + neg_sum = dot."""
import torch

from cpl_kernels import analysis


def make():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(6, 6) for _ in range(2)]),
                                 "head": torch.nn.Linear(6, 3)})
    names = [n for n, _ in model.named_parameters()]
    a = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    b = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    b["head.bias"][0] = 0.0
    return model, names, a, b


def test_tensor_rows_match_plain_pytorch():
    model, names, a, b = make()
    rows = analysis.tensor_stats(model, a, b)
    assert [r.name for r in rows] == names
    for r in rows:
        prod = a[r.name].double() * b[r.name].double()
        assert (r.n_pos, r.n_neg, r.n_zero) == (int((prod > 0).sum()), int((prod < 0).sum()), int((prod == 0).sum()))
        assert abs(r.dot - float(prod.sum())) < 1e-12
        assert r.collaborative + r.conflicting == 1.0
    assert rows[-1].n_zero == 1 and rows[-1].zero == 1 / 3


def test_layer_rows_sum_tensors_and_table_prints():
    model, names, a, b = make()
    model.zero_grad()
    for n, p in model.named_parameters():
        p.grad = a[n].clone()
    rows = analysis.tensor_stats(model, None, b)  # grads_a=None reads .grad
    layers = analysis.layer_stats(rows)
    assert [r.name for r in layers] == ["layers.0", "layers.1", "head", "total"]
    assert layers[0].numel == 42 and layers[-1].numel == sum(r.numel for r in rows)
    dot = sum(float((a[n].double() * b[n].double()).sum()) for n in names)
    assert abs(layers[-1].dot - dot) < 1e-12
    table = analysis.format_table(layers)
    assert table.splitlines()[0].split()[:3] == ["name", "numel", "conflict"]
    assert "layers.1" in table and len(table.splitlines()) == 6
    assert analysis.layer_key("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert analysis.layer_key("lm_head.weight") == "lm_head"
