"""pytest-benchmark: MaskedAdamW at 10/30/50/100% active (random masks) and 30% of rows."""
import pytest

from .suite import params, run


@pytest.mark.parametrize("size,name", params("masked"))
def test_masked_adamw(benchmark, size, name):
    benchmark.group = f"masked {size}"
    run(benchmark, size, name)
