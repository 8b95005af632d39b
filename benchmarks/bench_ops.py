"""pytest-benchmark: sign-code packing and contribution statistics (16M fp32 elements), next to the
in-place bandwidth stream in the same group. Each ops row also records `pct_inplace_bandwidth`: its
bytes per second over the stream's, both medians of the same interleaved rounds (benchmarks/common.py:
pytest-benchmark times tests one after another, and on a shared machine the load drifts between them).
The full table with every row: python -m benchmarks.report."""
import dataclasses

import pytest

from .common import gbps, run_interleaved
from .suite import cases_for, params, run

ROUNDS = 7


def pct_of_bandwidth(size: str, name: str, rounds: int = ROUNDS) -> float:
    """% of the in-place bandwidth, the case and the stream timed in the same interleaved rounds."""
    cases = cases_for(size)
    stream = next(c for c in cases.values() if c.group == "bandwidth")
    pair = [dataclasses.replace(stream, times=[]), dataclasses.replace(cases[name], times=[])]
    run_interleaved(pair, rounds)
    return 100 * gbps(pair[1]) / gbps(pair[0])


@pytest.mark.parametrize("size,name", params("bandwidth") + params("ops"))
def test_pack_and_stats(benchmark, size, name):
    benchmark.group = f"ops {size}"
    run(benchmark, size, name)
    if cases_for(size)[name].group == "ops":
        benchmark.extra_info["pct_inplace_bandwidth"] = round(pct_of_bandwidth(size, name), 1)
