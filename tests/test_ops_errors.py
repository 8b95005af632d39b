"""Bad input gets a clear error naming the argument and the problem, before anything is written."""
import re

import pytest
import torch

from cpl_kernels import ops, reference as ref


def adam_args(n=40, dtype=torch.float32):
    p, g = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    return dict(param=p, grad=g, exp_avg=torch.zeros(n), exp_avg_sq=torch.zeros(n),
                codes=ops.empty_codes(p), step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.0, decoupled=True)


@pytest.mark.parametrize("change,argument,words", [
    (dict(grad=torch.randn(41)), "grad", "shape"),
    (dict(grad=torch.randn(40, dtype=torch.float64)), "grad", "dtype"),
    (dict(grad=torch.randn(40, dtype=torch.bfloat16)), "grad", "must match"),
    (dict(param=torch.randn(40, dtype=torch.float64)), "param", "dtype"),
    (dict(exp_avg=torch.zeros(39)), "exp_avg", "elements"),
    (dict(exp_avg_sq=torch.zeros(40, dtype=torch.float16)), "exp_avg_sq", "dtype"),
    (dict(grad=torch.randn(80)[::2]), "grad", "contiguous"),
    (dict(codes=torch.zeros(2, dtype=torch.int32)), "codes", "words"),
    (dict(codes=torch.zeros(3, dtype=torch.int64)), "codes", "dtype"),
    (dict(exp_avg=torch.zeros(40, device="meta")), "exp_avg", "is on meta but the other inputs are on cpu"),
    (dict(step=0), "step", "counts from 1"),
    (dict(lr=-1.0), "lr", ">= 0"),
    (dict(beta1=1.0), "beta1", "[0, 1)"),
    (dict(eps=float("nan")), "eps", "finite"),
    (dict(criterion="both"), "criterion", "one of"),
    (dict(grad=torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), (40,))), "grad", "dense"),
])
def test_adam_step_rejects_bad_arguments(change, argument, words):
    args = adam_args()
    param, before = args["param"], args["param"].clone()
    args.update(change)
    with pytest.raises(ValueError, match=f"'{argument}'.*{re.escape(words)}"):
        ops.cpl_adam_step_(**args)
    if args["param"] is param:
        assert torch.equal(param, before)  # nothing written


def test_sgd_step_needs_a_buffer_for_momentum_and_nesterov_rules():
    p, g = torch.randn(10), torch.randn(10)
    with pytest.raises(ValueError, match="'momentum_buffer' is required"):
        ops.cpl_sgd_step_(p, g, None, None, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="'nesterov' needs momentum > 0"):
        ops.cpl_sgd_step_(p, g, torch.zeros(10), None, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)


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
                                         1.0, 1e-3, 0.9, 0.999, 1e-8, 0.0)


def test_forced_backend_that_cannot_serve_is_an_error(monkeypatch):
    monkeypatch.setenv("CPL_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="CPL_BACKEND=cuda cannot serve a cpu tensor"):
        ops.pack_signs_(torch.randn(10))
    monkeypatch.setenv("CPL_BACKEND", "fastest")
    with pytest.raises(ValueError, match="CPL_BACKEND must be one of"):
        ops.pack_signs_(torch.randn(10))
