"""Index safety (docs/design.md section 3): every backend validates each index it dereferences
and raises before writing anything.

The compact state of masked_adamw_step_ (mask bits, block_offsets, len(exp_avg)) is corrupted in
each way the invariant can break; every backend must raise ValueError naming the argument, the
block and the values, and leave param, exp_avg and exp_avg_sq bit-identical. Each backend is
called both through cpl_kernels.ops and directly (the native op, the Triton function, the
reference function), so no check may live only in the Python wrapper. The step engine's list op
validates every entry before stepping any: tests/test_engine_native.py.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import available_backends, devices
from cpl_kernels import ops, reference as ref

N = 3000  # three 1024-element blocks, the last partial; 3000 % 32 = 24 bits in the last mask word
HYPER = (1.0, 1e-2, 0.9, 0.999, 1e-8, 0.01, True, None, None)  # ..., skip_nonfinite, grad_scale, found_inf

BACKENDS = [(d, b) for d in devices() for b in available_backends(d) + ["reference"]]


def direct(name: str):
    """The backend's own implementation, bypassing the ops wrapper's checks."""
    if name in ("cpp", "cuda"):
        return torch.ops.cpl.masked_adamw_step_
    if name == "triton":
        from cpl_kernels import triton as triton_ops
        return triton_ops.masked_adamw_step_
    return ref.masked_adamw_step_


def valid_state(device, n=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, generator=gen) < 0.3  # every block has active elements
    words = ref.pack_mask(mask)
    offsets = ref.mask_block_offsets(words, n)
    k = int(mask.sum())
    tensors = dict(param=torch.randn(n, generator=gen), grad=torch.randn(n, generator=gen),
                   mask_words=words, block_offsets=offsets,
                   exp_avg=torch.randn(k, generator=gen).mul_(0.1), exp_avg_sq=torch.rand(k, generator=gen).mul_(0.1))
    return {key: t.to(device) for key, t in tensors.items()}


def counts(s):
    return ref.mask_block_counts(s["mask_words"].cpu(), s["param"].numel()).tolist()


def corrupt(case: str, s: dict) -> str:
    """Breaks the state in place; returns the regex the error message must match."""
    off = s["block_offsets"]
    o = off.cpu().tolist()
    c = counts(s)
    k = s["exp_avg"].numel()
    if case == "negative_first":  # the issue-10 reproducer: 64 floats written before exp_avg
        off[0] = -64
        return r"'block_offsets' has a negative entry: block_offsets\[0\] = -64"
    if case == "negative":
        off[2] = -1
        return r"'block_offsets' has a negative entry: block_offsets\[2\] = -1"
    if case == "not_from_zero":
        off[0] = 5
        return r"'block_offsets' must start at 0, got block_offsets\[0\] = 5"
    if case == "past_state":
        off[1] = k + 100
        return rf"'block_offsets' entry block_offsets\[1\] = {k + 100} exceeds the {k} entries of 'exp_avg'"
    if case == "decreasing":
        off[2] = o[1] - 1
        return rf"'block_offsets' decreases at block 2: block_offsets\[2\] = {o[1] - 1} < block_offsets\[1\] = {o[1]}"
    if case == "inconsistent":
        off[2] = o[2] + 1
        return (rf"'block_offsets' does not match 'mask_words' at block 2: block_offsets\[2\] = {o[2] + 1}, "
                rf"but block_offsets\[1\] = {o[1]} plus the {c[1]} active elements of block 1 make {o[2]}")
    if case in ("state_short", "state_long"):
        k2 = k - 1 if case == "state_short" else k + 1
        s["exp_avg"] = s["exp_avg"][:k2].clone() if k2 < k else torch.cat([s["exp_avg"], s["exp_avg"][:1]])
        s["exp_avg_sq"] = s["exp_avg_sq"][:k2].clone() if k2 < k else torch.cat([s["exp_avg_sq"], s["exp_avg_sq"][:1]])
        return (rf"'exp_avg' has {k2} entries but the mask has {k} active elements "
                rf"\(block_offsets\[2\] = {o[2]} plus the {c[2]} of block 2\)")
    if case == "bits_past_numel":
        words = s["mask_words"]
        words[-1] = words[-1] | (1 << 30)  # the last word holds elements 2976..3007: bit 30 is 3006
        return rf"'mask_words' has bits set past the last of the {N} elements"
    raise AssertionError(case)


CORRUPTIONS = ["negative_first", "negative", "not_from_zero", "past_state", "decreasing", "inconsistent",
               "state_short", "state_long", "bits_past_numel"]


@pytest.mark.parametrize("via", ["ops", "direct"])
@pytest.mark.parametrize("case", CORRUPTIONS)
@pytest.mark.parametrize("device,name", BACKENDS, ids=[f"{d}-{b}" for d, b in BACKENDS])
def test_masked_adamw_rejects_corrupt_compact_state_before_writing(device, name, case, via, monkeypatch):
    monkeypatch.setenv("CPL_BACKEND", name)
    s = valid_state(device)
    pattern = corrupt(case, s)
    before = {key: t.clone() for key, t in s.items()}
    fn = ops.masked_adamw_step_ if via == "ops" else direct(name)
    with pytest.raises(ValueError, match=r"cpl\.masked_adamw_step_: argument " + pattern):
        fn(s["param"], s["grad"], s["mask_words"], s["block_offsets"], s["exp_avg"], s["exp_avg_sq"], *HYPER)
    for key in ("param", "exp_avg", "exp_avg_sq"):
        # Bit-identical, not just equal: compare the raw bits.
        assert torch.equal(s[key].view(torch.int32), before[key].view(torch.int32)), key


@pytest.mark.parametrize("device,name", BACKENDS, ids=[f"{d}-{b}" for d, b in BACKENDS])
def test_masked_adamw_accepts_valid_edge_states(device, name, monkeypatch):
    """The check rejects nothing valid: all-inactive, all-active, an empty tensor, one element."""
    monkeypatch.setenv("CPL_BACKEND", name)
    for n, fill in [(N, False), (N, True), (2048, True), (0, False), (1, True)]:
        mask = torch.full((n,), fill)
        words = ref.pack_mask(mask).to(device)
        k = int(mask.sum())
        p = torch.randn(n).to(device)
        m, v = torch.zeros(k, device=device), torch.zeros(k, device=device)
        direct(name)(p, torch.randn(n).to(device), words, ref.mask_block_offsets(words, n), m, v, *HYPER)
        assert bool(torch.isfinite(p).all())


@pytest.mark.parametrize("device,name", [(d, b) for d, b in BACKENDS if b in ("cpp", "cuda")],
                         ids=[f"{d}-{b}" for d, b in BACKENDS if b in ("cpp", "cuda")])
def test_native_masked_adamw_rejects_state_on_empty_param(device, name):
    p = torch.zeros(0, device=device)
    with pytest.raises(ValueError, match=r"'exp_avg' has 3 entries but an empty 'param' has no active elements"):
        torch.ops.cpl.masked_adamw_step_(p, p.clone(), torch.zeros(0, dtype=torch.int32, device=device),
                                         torch.zeros(0, dtype=torch.int64, device=device),
                                         torch.zeros(3, device=device), torch.zeros(3, device=device), *HYPER)


@pytest.mark.skipif(not torch._C._dispatch_has_kernel_for_dispatch_key("cpl::masked_adamw_step_", "CPU"),
                    reason="native CPU kernels not built")
def test_issue_10_reproducer_exits_cleanly():
    """The reported crash: a negative offset wrote before exp_avg and glibc aborted at exit
    (munmap_chunk(): invalid pointer). Run in a child so a corrupted heap cannot hide."""
    code = """
import torch, cpl_kernels
from cpl_kernels import reference as ref
n = 4096
words = ref.pack_mask(torch.ones(n, dtype=torch.bool))
offsets = ref.mask_block_offsets(words, n)
offsets[0] = -64
m, v = torch.zeros(n), torch.zeros(n)
try:
    torch.ops.cpl.masked_adamw_step_(torch.randn(n), torch.randn(n), words, offsets, m, v,
                                     1.0, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, None, None)
except ValueError as e:
    print("raised:", e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CPL_BACKEND": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "raised: cpl.masked_adamw_step_: argument 'block_offsets' has a negative entry" in proc.stdout
