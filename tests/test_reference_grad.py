"""build_reference: the sign of the mean mastered gradient, both schedules, grads put back."""
import torch

from cpl_kernels import CPLAdamW, build_reference
from cpl_kernels import reference as ref


def setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Flatten(), torch.nn.Linear(24, 5))
    batches = [(torch.randint(0, 10, (4, 3)), torch.randint(0, 5, (4,))) for _ in range(3)]  # tokens >= 10 unseen
    return model, batches


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def expected_signs(model, batches):
    total = [torch.zeros_like(p) for p in model.parameters()]
    for b in batches:
        grads = torch.autograd.grad(loss_fn(model, b), list(model.parameters()))
        total = [t + g / len(batches) for t, g in zip(total, grads)]
    return [torch.sign(t).reshape(-1) for t in total]


def codes_signs(opt, p):
    return ref.unpack_signs(opt.state[p]["cpl_codes"], p.numel())


def test_full_pass_reference_is_the_sign_of_the_mean_gradient():
    model, batches = setup()
    opt = CPLAdamW(model.parameters())
    used = build_reference(opt, model, batches, loss_fn, progress=False)
    assert used == 3
    for p, s in zip(model.parameters(), expected_signs(model, batches)):
        assert torch.equal(codes_signs(opt, p), s)
        assert p.grad is None  # the mastered gradients are freed
    emb = codes_signs(opt, model[0].weight).view(20, 8)
    assert (emb[10:] == 0).all() and (emb[:10] != 0).any()  # unseen rows: zero, always collaborative


def test_per_step_sampled_batch_and_generator_input():
    model, batches = setup()
    opt = CPLAdamW(model.parameters())
    build_reference(opt, model, [batches[1]], loss_fn, progress=True)
    for p, s in zip(model.parameters(), expected_signs(model, [batches[1]])):
        assert torch.equal(codes_signs(opt, p), s)
    assert build_reference(opt, model, (b for b in batches), loss_fn, progress=False) == 3  # unsized
    for p, s in zip(model.parameters(), expected_signs(model, batches)):
        assert torch.equal(codes_signs(opt, p), s)


def test_existing_gradients_are_put_back_and_step_uses_them():
    model, batches = setup()
    opt = CPLAdamW(model.parameters(), lr=0.1)
    loss_fn(model, batches[0]).backward()
    injection = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    build_reference(opt, model, batches[1:], loss_fn, progress=False)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), injection))
    opt.step()
    assert 0 < opt.frozen_fraction < 1
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
