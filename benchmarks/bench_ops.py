"""pytest-benchmark: sign-code packing and contribution statistics (16M fp32 elements)."""
import pytest

from .suite import params, run


@pytest.mark.parametrize("size,name", params("ops"))
def test_pack_and_stats(benchmark, size, name):
    benchmark.group = f"ops {size}"
    run(benchmark, size, name)
