"""MaskedAdamW under FSDP2 (DTensor parameters, 2 CPU processes over gloo): masked and stepped
shard by shard (each rank holds its shard's mask and compact state), update_masks mid-run, equal
to the single-process run; checkpoints through torch.distributed.checkpoint (plain state_dict and
get/set_optimizer_state_dict) resume exactly on the same world size and are refused by name on
another."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cpl_kernels import MaskedAdamW
from cpl_kernels import reference as ref
from test_distributed import TOL, free_port, fsdp2_unavailable

STEPS, UPDATE_AT, SAVE_AT, WORLD = 10, 4, 6, 2
HYPER = dict(lr=0.05, betas=(0.9, 0.99), weight_decay=0.1)


def make_model():
    torch.manual_seed(0)
    # Linear(32, 3): 3 rows over 2 ranks, an uneven shard (2 + 1 rows)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def masks_for(model, frac, seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) < frac for n, p in model.named_parameters()}


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(STEPS)]


def train(model, opt, steps, shard=lambda b: b, on_step=lambda t: None):
    data = batches()
    for t in steps:
        on_step(t)
        if t == UPDATE_AT:
            opt.update_masks(place(model, masks_for(model, 0.6, seed=8)))
        opt.zero_grad()
        x, y = shard(data[t])
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def place(model, masks):
    """Under FSDP2 one mask goes in as a DTensor placed like its parameter; the others as full
    plain tensors (each rank keeps its part)."""
    params = dict(model.named_parameters())
    if hasattr(params["0.weight"], "to_local"):
        from torch.distributed.tensor import distribute_tensor
        p = params["0.weight"]
        masks = dict(masks, **{"0.weight": distribute_tensor(masks["0.weight"], p.device_mesh, p.placements)})
    return masks


def full(model):
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _worker(rank, port, world, ckpt, out_path, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
        from torch.distributed.fsdp import fully_shard
        torch.set_num_threads(1)

        def shard(b):
            return tuple(x.chunk(world)[rank] for x in b)

        def sharded_model_and_opt(masks_seed=5):
            model = make_model()
            fully_shard(model)
            opt = MaskedAdamW(model.named_parameters(), masks=place(model, masks_for(model, 0.3, masks_seed)), **HYPER)
            return model, opt

        if mode == "other-world":  # load a checkpoint saved by 2 ranks
            model, opt = sharded_model_and_opt()
            sd = {"model": model.state_dict(), "optim": opt.state_dict()}
            dcp.load(sd, checkpoint_id=os.path.join(ckpt, "raw"))
            try:
                opt.load_state_dict(sd["optim"])
                result = None
            except ValueError as exc:
                result = str(exc)
            torch.save(result, out_path)
            return
        model, opt = sharded_model_and_opt()
        assert all(hasattr(p, "to_local") for p in model.parameters())

        def save(t):
            if t == SAVE_AT:
                dcp.save({"model": model.state_dict(), "optim": opt.state_dict()},
                         checkpoint_id=os.path.join(ckpt, "raw"))
                dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)},
                         checkpoint_id=os.path.join(ckpt, "fqn"))

        train(model, opt, range(STEPS), shard, on_step=save)
        result = {"params": full(model), "active": opt.active_counts(), "state_bytes": opt.state_bytes(),
                  "local_numels": [p.to_local().numel() for p in model.parameters()]}
        for how in ("raw", "fqn"):  # resume from step SAVE_AT with optimizers built on other masks
            model2, opt2 = sharded_model_and_opt(masks_seed=11)
            osd = opt2.state_dict() if how == "raw" else get_optimizer_state_dict(model2, opt2)
            sd = {"model": model2.state_dict(), "optim": osd}
            dcp.load(sd, checkpoint_id=os.path.join(ckpt, how))
            if how == "raw":
                opt2.load_state_dict(sd["optim"])
            else:
                set_optimizer_state_dict(model2, opt2, sd["optim"])
            train(model2, opt2, range(SAVE_AT, STEPS), shard)
            result[how] = full(model2)
        if rank == 0:
            torch.save(result, out_path)
        else:
            torch.save({k: result[k] for k in ("active", "state_bytes", "local_numels")}, out_path + ".1")
    finally:
        dist.destroy_process_group()


pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available() or fsdp2_unavailable(),
                                reason="needs gloo and torch.distributed.fsdp.fully_shard")


def test_fsdp2_masked_adamw_equals_single_process_and_resumes_exactly(tmp_path):
    out, ckpt = str(tmp_path / "result.pt"), str(tmp_path / "ckpt")
    mp.start_processes(_worker, args=(free_port(), WORLD, ckpt, out, "train"), nprocs=WORLD,
                       start_method="spawn", join=True)
    got, other = torch.load(out, weights_only=True), torch.load(out + ".1", weights_only=True)
    model = make_model()
    opt = MaskedAdamW(model.named_parameters(), masks=masks_for(model, 0.3, 5), **HYPER)
    train(model, opt, range(STEPS))
    for a, b in zip(got["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), **TOL)
    # Each rank holds only its shard's compact state: together, exactly the single process's.
    assert [a + b for a, b in zip(got["active"], other["active"])] == opt.active_counts()
    for r in (got, other):  # m, v per active element of the shard + the shard's words, offsets, step
        assert r["state_bytes"] == sum(8 * k + 4 * ref.num_mask_words(n) + 8 * ref.num_offset_blocks(n) + 4
                                       for k, n in zip(r["active"], r["local_numels"]))
    assert got["local_numels"] != other["local_numels"]  # an uneven shard was stepped
    # Resumed from the checkpoint of step SAVE_AT, bit for bit the uninterrupted run.
    for how in ("raw", "fqn"):
        assert all(torch.equal(a, b) for a, b in zip(got[how], got["params"])), how
    # Another world size: refused by name, never another shard's state.
    out1 = str(tmp_path / "other.pt")
    mp.start_processes(_worker, args=(free_port(), 1, ckpt, out1, "other-world"), nprocs=1,
                       start_method="spawn", join=True)
    msg = torch.load(out1, weights_only=True)
    assert msg is not None and "world of 2" in msg and "world of 1" in msg and "'0.weight'" in msg, msg
