"""DDP and FSDP2 (fully_shard, DTensor params) with 2 CPU processes over gloo: parameters after 10
CPL steps (reference rebuilt through the wrapped model) equal the single-process run. CPLAdamW8bit
under FSDP2 too: its 8-bit blocks are laid over each rank's shard, which here starts on a block
boundary (a [512, 16] weight, 4096 elements a shard), so the block layout is the single process's
and only the gradient reduction order differs."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cpl_kernels import CPLAdamW, CPLAdamW8bit, build_reference

STEPS, WORLD = 10, 2
TOL = dict(rtol=1e-5, atol=1e-6)
# 8-bit state: a last-bit difference in a reduced gradient can move a value across a code
# threshold (one code step of m is ~1% of its block's absmax), so the runs agree to lr * 1e-3.
TOL_8BIT = dict(rtol=1e-4, atol=5e-5)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(hidden=32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 4))


def setup(kind):
    """(optimizer class, hidden width): 512 gives the 8-bit run one tensor with 8-bit state."""
    return (CPLAdamW8bit, 512) if kind.endswith("8bit") else (CPLAdamW, 32)


def data():
    gen = torch.Generator().manual_seed(1)
    inject = [(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)) for _ in range(STEPS)]
    mastered = [(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)) for _ in range(2)]
    return inject, mastered


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def train(model, params, inject, mastered, shard=lambda b: b, cls=CPLAdamW):
    """Every rank sees its half of each batch; the mean over ranks is the full-batch mean."""
    opt = cls(params, lr=0.05)
    fractions = []
    for t, batch in enumerate(inject):
        if t % 5 == 0:
            build_reference(opt, model, [shard(b) for b in mastered], loss_fn, progress=False)
        opt.zero_grad()
        loss_fn(model, shard(batch)).backward()
        opt.step()
        fractions.append(opt.frozen_fraction)
    return fractions


def _worker(rank, port, kind, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        inject, mastered = data()
        cls, hidden = setup(kind)
        model = make_model(hidden)

        def shard(b):
            return tuple(x.chunk(WORLD)[rank] for x in b)

        if kind == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
            train(wrapped, wrapped.parameters(), inject, mastered, shard)
            full = [p.detach().clone() for p in model.parameters()]
        else:
            from torch.distributed.fsdp import fully_shard
            fully_shard(model)
            assert all(hasattr(p, "to_local") for p in model.parameters())  # DTensor params
            opt_fractions = train(model, model.parameters(), inject, mastered, shard, cls)
            full = [p.full_tensor().detach().clone() for p in model.parameters()]
            assert sum(opt_fractions) > 0
        if rank == 0:
            torch.save(full, out_path)
    finally:
        dist.destroy_process_group()


def fsdp2_unavailable():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        return f"torch.distributed.fsdp.fully_shard is not importable: {exc}"
    return None


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
@pytest.mark.parametrize("kind", ["ddp", "fsdp2", "fsdp2-8bit"])
def test_two_process_run_equals_single_process(kind, tmp_path):
    if kind.startswith("fsdp2") and fsdp2_unavailable():
        pytest.skip(fsdp2_unavailable())
    out = tmp_path / "params.pt"
    mp.start_processes(_worker, args=(free_port(), kind, str(out)), nprocs=WORLD, start_method="spawn", join=True)
    inject, mastered = data()
    cls, hidden = setup(kind)
    model = make_model(hidden)
    fractions = train(model, model.parameters(), inject, mastered, cls=cls)
    assert sum(fractions) > 0  # the reference did freeze elements
    got = torch.load(out, weights_only=True)
    for a, b in zip(got, model.parameters()):
        torch.testing.assert_close(a, b.detach(), **(TOL_8BIT if kind.endswith("8bit") else TOL))


# ---- steps inside backward (cpl_kernels.in_backward) under FSDP2 ----------------------------------

def _in_backward_worker(rank, port, nested, out_path):
    """FSDP2 calls the post-accumulate-grad hooks of each sharded parameter after its
    reduce-scatter: the hook steps the local shard with the reduced gradient."""
    from torch.distributed.fsdp import fully_shard

    from cpl_kernels import in_backward
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        inject, mastered = data()
        model = make_model()
        if nested:  # one FSDP group per layer (reduce-scatters during backward) and the root
            for layer in (model[0], model[2]):
                fully_shard(layer)
        fully_shard(model)  # alone: the only reduce-scatter runs in FSDP's final callback

        def shard(b):
            return tuple(x.chunk(WORLD)[rank] for x in b)

        opt = CPLAdamW(model.parameters(), lr=0.05)
        attached = in_backward(opt)
        local_numel = sum(p.to_local().numel() for p in model.parameters())
        for t, batch in enumerate(inject):
            if t % 5 == 0:  # per-epoch style: two batches, accumulated then packed
                build_reference(opt, model, [shard(b) for b in mastered], loss_fn)
            else:           # per step: packed in the hooks
                with attached.reference_pass():
                    loss_fn(model, shard(mastered[t % 2])).backward()
            loss_fn(model, shard(batch)).backward()
            assert all(p.grad is None for p in model.parameters())
            assert opt.stepped_counts == [local_numel]  # one step per backward, every shard
        attached.detach()
        full = [p.full_tensor().detach().clone() for p in model.parameters()]
        if rank == 0:
            torch.save(full, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
@pytest.mark.parametrize("nested", [False, True], ids=["root-only", "per-layer"])
def test_fsdp2_in_backward_equals_single_process_step(nested, tmp_path):
    if fsdp2_unavailable():
        pytest.skip(fsdp2_unavailable())
    out = tmp_path / "params.pt"
    mp.start_processes(_in_backward_worker, args=(free_port(), nested, str(out)), nprocs=WORLD,
                       start_method="spawn", join=True)
    inject, mastered = data()
    model = make_model()
    opt = CPLAdamW(model.parameters(), lr=0.05)
    for t, batch in enumerate(inject):
        build_reference(opt, model, mastered if t % 5 == 0 else [mastered[t % 2]], loss_fn)
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
    got = torch.load(out, weights_only=True)
    for a, b in zip(got, model.parameters()):
        torch.testing.assert_close(a, b.detach(), **TOL)
