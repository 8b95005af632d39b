"""The EWC and gradient-surgery baselines on a tiny configuration: EWC's penalty gradient equals
autograd's, its Fisher is a mean of squared per-row gradients; surgery's projected gradient never
conflicts with the reference gradient (per tensor, hence in total) and leaves tensors that did not
conflict alone; both train; the LoRA learning-rate scale reaches its optimizer."""
import copy

import pytest
import torch

from cpl_lab.config import LabConfig
from cpl_lab.lab import prepare
from cpl_lab.methods import REGISTRY, Context, loss_fn
from cpl_lab.methods.base import trainable
from cpl_lab.methods.ewc import diagonal_fisher
from cpl_lab.methods.surgery import project_conflicting


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = LabConfig(n_entities=8, relations=3, hidden=32, layers=1, heads=2, intermediate=64,
                    pretrain_lr=1e-2, pretrain_max_epochs=60, pretrain_target=0.9, epochs=1,
                    batch_size=8, ref_batch=8, threads=1, ewc_lambda=50.0, lora_lr_scale=7.0)
    yield prepare(cfg, tmp_path_factory.mktemp("cache"), progress=False, log=lambda *a: None)
    torch.set_num_threads(n)


def make(lab, name, lr=1e-3, seed=0):
    model = copy.deepcopy(lab.model)
    model.train()
    ctx = Context(lab.cfg, lr, seed, lab.inject, lab.mastered_in, torch.Generator().manual_seed(seed))
    return REGISTRY[name](model, ctx)


def test_fisher_is_the_mean_of_squared_per_row_gradients(lab):
    model = copy.deepcopy(lab.model)
    params = trainable(model)
    enc = lab.mastered_in.rows(range(3))
    fisher = diagonal_fisher(model, params, enc)
    expect = [torch.zeros_like(p) for p in params]
    for i in range(3):
        grads = torch.autograd.grad(loss_fn(model, enc.rows([i])), params, allow_unused=True)
        for e, g in zip(expect, grads):
            if g is not None:
                e += g.square() / 3
    for f, e in zip(fisher, expect):
        torch.testing.assert_close(f, e)
    assert all(p.grad is None for p in params)  # leaves no gradient behind
    assert sum(float(f.sum()) for f in fisher) > 0


def test_ewc_penalty_gradient_matches_autograd(lab):
    ewc = make(lab, "ewc")
    ewc.step(lab.inject.rows(range(8)))  # move away from the anchor: the penalty is now nonzero
    ewc.step(lab.inject.rows(range(8, 16)))
    params = ewc.params
    penalty = ewc.penalty()
    assert float(penalty.detach()) > 0
    auto = torch.autograd.grad(penalty, params)
    for p in params:
        p.grad = None
    ewc.add_penalty_grad()
    for p, a in zip(params, auto):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-12)
    # added on top of an existing gradient, not instead of it
    base = [torch.randn_like(p) for p in params]
    for p, b in zip(params, base):
        p.grad = b.clone()
    ewc.add_penalty_grad()
    for p, a, b in zip(params, auto, base):
        torch.testing.assert_close(p.grad, a + b, rtol=1e-5, atol=1e-7)


def test_ewc_lambda_zero_is_fine_tuning(lab):
    lab.cfg.ewc_lambda = 0.0
    try:
        ewc, ft = make(lab, "ewc"), make(lab, "ft")
    finally:
        lab.cfg.ewc_lambda = 50.0
    for enc in (lab.inject.rows(range(8)), lab.inject.rows(range(8, 16))):
        ewc.step(enc)
        ft.step(enc)
    for a, b in zip(ewc.params, trainable(ft.model)):
        torch.testing.assert_close(a, b)


def test_surgery_projection_never_conflicts():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 7, generator=gen) for _ in range(40)]
    refs = [torch.randn(5, 7, generator=gen) for _ in range(40)]
    refs[3] = torch.zeros(5, 7)  # no reference signal: left alone
    out, projected = project_conflicting(grads, refs)
    conflicting = [float((g * r).sum()) < 0 for g, r in zip(grads, refs)]
    assert projected == sum(conflicting) and 0 < projected < 40
    for g, r, o, c in zip(grads, refs, out, conflicting):
        dot = float((o.double() * r.double()).sum())
        # >= 0 up to the rounding of the projected gradient back to float32
        assert dot >= -1e-6 * float(g.norm() * r.norm())
        if c:
            assert abs(dot) <= 1e-5 * float(g.norm() * r.norm())  # only the conflicting part went
            # what was removed is parallel to r
            torch.testing.assert_close(((g - o) * r).sum() / r.norm() ** 2 * r, g - o, atol=1e-5, rtol=1e-4)
        else:
            assert o is g
    total = sum(float((o * r).sum()) for o, r in zip(out, refs))
    assert total >= 0


def test_surgery_step_on_the_tiny_model(lab):
    sur = make(lab, "surgery", seed=3)
    params = trainable(sur.model)
    batch = lab.inject.rows(range(8))
    # Replay the step's draws: the reference batch comes from the same generator state.
    gen_state = sur.ctx.generator.get_state()
    refs = sur.reference_grads()
    sur.ctx.generator.set_state(gen_state)
    sur.opt.zero_grad(set_to_none=True)
    loss_fn(sur.model, batch).backward()
    raw = [p.grad.clone() for p in params]
    before = [p.detach().clone() for p in params]
    captured = []
    orig = sur.opt.step
    sur.opt.step = lambda: (captured.append([p.grad.clone() for p in params]), orig())[1]
    sur.step(batch)
    stepped = captured[0]
    for g, r in zip(stepped, refs):
        assert float((g.double() * r.double()).sum()) >= -1e-6 * float(g.norm() * r.norm() + 1e-30)
    assert any(not torch.equal(g, r0) for g, r0 in zip(stepped, raw))  # something was projected
    assert sum(float((g * r).sum()) for g, r in zip(raw, refs)) != 0
    assert any(not torch.equal(p, b) for p, b in zip(params, before))  # and it trained


def test_lora_trains_at_the_scaled_rate(lab):
    lora = make(lab, "lora", lr=2e-4)
    assert lora.opt.param_groups[0]["lr"] == pytest.approx(2e-4 * 7.0)


def test_cpl_ref_every_rebuilds_the_reference_every_n_steps(lab, monkeypatch):
    import cpl_kernels
    calls = []
    real = cpl_kernels.build_reference
    monkeypatch.setattr(cpl_kernels, "build_reference",
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    lab.cfg.ref_every = 3
    try:
        cpl = make(lab, "cpl")
        for i in range(7):
            cpl.step(lab.inject.rows(range(i, i + 4)))
    finally:
        lab.cfg.ref_every = 1
    assert len(calls) == 3  # steps 0, 3 and 6


def test_cpl_masked_epoch_recomputes_the_mask_at_each_later_epoch(lab):
    import cpl_kernels
    from cpl_kernels import reference as ref
    from cpl_lab.methods.static import mean_grads

    method = make(lab, "cpl-masked-epoch")
    params, bs = method.params, lab.cfg.ref_batch

    def cpl_mask_now():
        return cpl_kernels.cpl_masks_once(mean_grads(method.model, params, lab.inject, bs),
                                          mean_grads(method.model, params, lab.mastered_in, bs))

    def words():
        return [method.opt.state[p]["mask_words"].clone() for p in params]

    first = cpl_mask_now()
    assert all(torch.equal(w, ref.pack_mask(m)) for w, m in zip(words(), first))
    method.start_epoch(1)  # the constructor's masks are those of these weights: kept
    assert all(torch.equal(w, ref.pack_mask(m)) for w, m in zip(words(), first))
    for i in range(4):
        method.step(lab.inject.rows(range(4 * i, 4 * i + 4)))
    steps = [float(method.opt.state[p]["step"]) for p in params]
    method.start_epoch(2)
    again = cpl_mask_now()
    assert any(not torch.equal(a, b) for a, b in zip(first, again))  # the weights moved, the mask too
    assert all(torch.equal(w, ref.pack_mask(m)) for w, m in zip(words(), again))
    assert [float(method.opt.state[p]["step"]) for p in params] == steps
    assert method.fraction == pytest.approx(1 - sum(int(m.sum()) for m in again) / sum(m.numel() for m in again))


def test_mofo_updates_the_top_alpha_of_filtered_tensors_and_all_of_norms(lab):
    mofo = make(lab, "mofo")
    named = dict(mofo.model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    mofo.step(lab.inject.rows(range(8)))
    for n, p in named.items():
        moved = int((p.detach() != before[n]).sum())
        if "norm" in n:
            assert moved == p.numel(), n  # the authors' AdamW_MoFO: norms unfiltered
        else:  # exact threshold (these tensors are below the sample size): floor(0.15 n), plus ties
            k = max(1, int(lab.cfg.mofo_alpha * p.numel()))
            assert k <= moved <= p.numel() // 5, (n, moved, k)
    frozen = mofo.take_frozen()
    assert 0.75 < frozen < 0.85


def test_cpl_mofo_moves_only_collaborative_top_momentum_elements(lab):
    both, alone = make(lab, "cpl-mofo"), make(lab, "mofo")
    batch = lab.inject.rows(range(8))
    both.step(batch)
    alone.step(batch)
    assert both.opt.has_reference and not alone.opt.has_reference
    # CPL freezes some of what the momentum filter alone would move (criterion "gradient": the
    # filter runs over collaborative momentum, so its pick differs too): it moves less.
    assert both.take_frozen() > alone.take_frozen()
    assert sum(both.opt.frozen_counts) > 0


def test_mofo_methods_refuse_sgd():
    with pytest.raises(ValueError, match=r"mofo run on MoFOAdamW and need --optimizer adam or adamw"):
        LabConfig(methods=["mofo"], optimizer="sgd").validate()
    with pytest.raises(ValueError, match=r"mofo_alpha"):
        LabConfig(methods=["mofo"], mofo_alpha=0.0).validate()
