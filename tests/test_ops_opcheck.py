"""torch.library.opcheck on every op and every device with native kernels: schema (mutation
annotations), fake/meta implementations, autograd registration, AOT dispatch."""
import pytest
import torch

from cpl_kernels import _backend, ops, quant8, reference as ref

pytestmark = pytest.mark.skipif(not _backend.native_loaded(), reason="native library not built")

DEVICES = [d for d, key in (("cpu", "CPU"), ("cuda", "CUDA"))
           if _backend.has_native_kernel(key) and (d == "cpu" or torch.cuda.is_available())]


def cases(device):
    n = 1000
    gen = torch.Generator().manual_seed(0)
    p, g, r = (torch.randn(n, generator=gen).to(device) for _ in range(3))
    codes = ref.pack_signs_(r.cpu(), ops.empty_codes(r.cpu())).to(device)
    zeros = lambda k=n: torch.zeros(k, device=device)  # noqa: E731
    words = ref.pack_mask(torch.rand(n, generator=gen) < 0.3).to(device)
    offsets = ref.mask_block_offsets(words.cpu(), n).to(device)
    active = int(ref.unpack_mask(words.cpu(), n).sum())
    q8 = lambda: torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).to(device)  # noqa: E731
    scalar = lambda x: torch.tensor(x, dtype=torch.float64, device=device)  # noqa: E731
    return {
        # The step engine: two entries (codes / none), AdamW, GradScaler's protocol (scale 2, no inf).
        "cpl_step_": ([p.clone(), g.clone()], [g, p], [zeros(), zeros()], [zeros(), zeros()], [codes, None],
                      "adamw", scalar(2.0), scalar(1e-3), [0.9, 0.999, 1e-8, 0.01], "gradient", True, True,
                      torch.tensor(2.0, device=device), torch.tensor(0.0, device=device)),
        # The 8-bit state format: a tensor with a partial last block and one of several blocks.
        "cpl_step_8bit_": ([p.clone(), g.clone()], [g, p], [q8(), q8()], [zeros(4), zeros(4)], [q8(), q8()],
                           [zeros(4), zeros(4)], quant8.qmaps((True, False), device), [codes, None], "adamw",
                           scalar(2.0), scalar(1e-3), [0.9, 0.999, 1e-8, 0.01], "update", True, True, None, None),
        "pack_signs_": (p, ops.empty_codes(p)),
        "contribution_stats": (p, g, ops.empty_mask(p)),
        "contribution_stats_codes": (p, codes, None),
        # Non-finite skip on, GradScaler's scale 2 and found_inf 0.
        "masked_adamw_step_": (p.clone(), g, words, offsets, zeros(active), zeros(active), 1.0, 1e-3,
                               0.9, 0.999, 1e-8, 0.01, True, torch.tensor(2.0, device=device),
                               torch.tensor(0.0, device=device)),
        "cpl_mask_words": (p, g, None, ops.empty_mask(p),
                           torch.zeros(ref.num_offset_blocks(n), dtype=torch.int64, device=device)),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", list(cases("cpu")))
def test_opcheck(device, op_name):
    key = "CPU" if device == "cpu" else "CUDA"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"cpl::{op_name}", key):
        pytest.skip(f"no {key} kernel for cpl::{op_name} in this build")
    args = cases(device)[op_name]
    torch.library.opcheck(getattr(torch.ops.cpl, op_name), args)
