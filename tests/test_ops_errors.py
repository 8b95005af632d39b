"""Bad input gets a clear error naming the argument and the problem, before anything is written."""
import pytest
import torch

from cpl_kernels import ops, reference as ref


def test_pack_and_stats_reject_mismatched_buffers():
    x = torch.randn(100)
    with pytest.raises(ValueError, match="'codes' holds 6 int32 words but 100 elements need 7"):
        ops.pack_signs_(x, torch.zeros(6, dtype=torch.int32))
    with pytest.raises(ValueError, match="'b' has 99 elements"):
        ops.contribution_stats(x, torch.randn(99))
    with pytest.raises(ValueError, match="'mask_out' holds 3 int32 words but 100 elements need 4"):
        ops.contribution_stats(x, torch.randn(100), torch.zeros(3, dtype=torch.int32))


def test_masked_adamw_rejects_bad_compact_state():
    p, g = torch.randn(100), torch.randn(100)
    words = ref.pack_mask(torch.ones(100, dtype=torch.bool))
    offsets = ref.mask_block_offsets(words, 100)
    with pytest.raises(ValueError, match="'block_offsets' has dtype int32"):
        ops.masked_adamw_step_(p, g, words, offsets.int(), torch.zeros(100), torch.zeros(100), 1, 1e-3, 0.9, 0.999, 1e-8, 0)
    with pytest.raises(ValueError, match="'exp_avg_sq' has 99 elements; expected 100"):
        ops.masked_adamw_step_(p, g, words, offsets, torch.zeros(100), torch.zeros(99), 1, 1e-3, 0.9, 0.999, 1e-8, 0)


def test_native_kernel_rejects_too_small_compact_state_without_writing_past_it():
    """Called directly (bypassing the wrapper's checks), the C++ kernel still refuses a state
    shorter than the mask's active count instead of writing out of bounds (every corruption of
    the compact state, on every backend: tests/test_ops_index_safety.py)."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("cpl::masked_adamw_step_", "CPU"):
        pytest.skip("native CPU kernels not built")
    p, g = torch.randn(100), torch.randn(100)
    words = ref.pack_mask(torch.ones(100, dtype=torch.bool))
    offsets = ref.mask_block_offsets(words, 100)
    with pytest.raises(ValueError, match="'exp_avg' has 10 entries but the mask has 100 active elements"):
        torch.ops.cpl.masked_adamw_step_(p, g, words, offsets, torch.zeros(10), torch.zeros(10),
                                         1.0, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, None, None)


def test_forced_backend_that_cannot_serve_is_an_error(monkeypatch):
    monkeypatch.setenv("CPL_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="CPL_BACKEND=cuda cannot serve a cpu tensor"):
        ops.pack_signs_(torch.randn(10))
    monkeypatch.setenv("CPL_BACKEND", "fastest")
    with pytest.raises(ValueError, match="CPL_BACKEND must be one of"):
        ops.pack_signs_(torch.randn(10))
