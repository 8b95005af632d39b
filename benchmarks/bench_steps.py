"""pytest-benchmark: optimizer steps (torch AdamW fused/foreach, CPL cpp/reference, paper-style)
and the in-place bandwidth stream on the same model-shaped tensors. Ratios: python -m benchmarks.report."""
import pytest

from .suite import params, run


@pytest.mark.parametrize("size,name", params("bandwidth") + params("adamw"))
def test_baselines(benchmark, size, name):
    benchmark.group = f"steps {size}"
    run(benchmark, size, name)


@pytest.mark.parametrize("size,name", params("cpl") + params("mofo"))
def test_cpl_steps(benchmark, size, name):
    benchmark.group = f"steps {size}"
    run(benchmark, size, name)
