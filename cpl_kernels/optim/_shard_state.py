"""Per-rank compact state of DTensor (FSDP2) parameters in a checkpoint.

MaskedAdamW keeps m and v only for a shard's active elements, so each rank's state has its own
length, with no global shape: it cannot be a DTensor placed like the parameter. In a state_dict it
is one opaque `bytes` value per parameter under a key naming the rank (RANK_PREFIX + rank), for
two reasons: torch.distributed.checkpoint saves a plain tensor once for all ranks (it treats it as
replicated and keeps one copy), which would silently hand rank 0's state to every rank on load;
and it loads a tensor into a template of the same size, which a resume cannot give when the mask
changed (update_masks) after the template's optimizer was built. A `bytes` value is saved per key
and handed back whatever its size. Each blob records the shard it belongs to (world size, the
rank's mesh coordinate, placements, global and local shape), so a load on another world size or
sharding is refused by name instead of training on another shard's state.
"""
from __future__ import annotations

import io

import torch
from torch import Tensor

from ._base import local

RANK_PREFIX = "cpl_shard_rank"


def rank_key() -> str:
    import torch.distributed as dist
    return f"{RANK_PREFIX}{dist.get_rank() if dist.is_available() and dist.is_initialized() else 0}"


def is_shard_key(key) -> bool:
    return isinstance(key, str) and key.startswith(RANK_PREFIX)


def shard_of(p: Tensor) -> dict:
    """What identifies p's local shard: equal on save and load means the same elements."""
    mesh = p.device_mesh
    return {"world_size": mesh.size(), "mesh_shape": list(mesh.shape),
            "coordinate": list(mesh.get_coordinate() or []),
            "placements": [str(x) for x in p.placements],
            "global_shape": list(p.shape), "local_shape": list(local(p).shape)}


def pack(p: Tensor, tensors: dict[str, Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save({"shard": shard_of(p), "tensors": {k: v.detach().cpu() for k, v in tensors.items()}}, buf)
    return buf.getvalue()


def unpack(owner: str, name: str, p: Tensor, blob, key: str) -> dict[str, Tensor]:
    """The tensors of a blob saved for p's shard; raises naming both shards when it is another's."""
    if not isinstance(blob, (bytes, bytearray)):
        raise ValueError(f"{owner}: '{key}' of parameter {name} is a {type(blob).__name__}, not the "
                         "bytes MaskedAdamW saves")
    data = torch.load(io.BytesIO(blob), weights_only=True)
    saved, here = data["shard"], shard_of(p)
    if saved != here:
        raise ValueError(
            f"{owner}: the compact state of parameter {name} under '{key}' was saved for the shard "
            f"{_describe(saved)}, but this rank holds the shard {_describe(here)}. MaskedAdamW keeps "
            "m and v only for each shard's active elements, so its state resumes only on the same "
            "world size and sharding it was saved with; to change them, rebuild the optimizer from "
            "the masks (update_masks or a new MaskedAdamW): m and v then restart at zero.")
    return data["tensors"]


def _describe(shard: dict) -> str:
    return (f"at mesh coordinate {shard['coordinate']} of a world of {shard['world_size']} "
            f"({', '.join(shard['placements'])}, local shape {tuple(shard['local_shape'])} of "
            f"{tuple(shard['global_shape'])})")
