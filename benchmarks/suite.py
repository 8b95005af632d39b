"""Cases for the pytest-benchmark suites, built once per size and shared by the bench_*.py files.
Sizes: BENCH_SIZES (comma list of 16M, 64M; default 16M) to keep a suite run short."""
from __future__ import annotations

import functools
import os

from .cases import all_cases
from .common import SIZES, bandwidth_case

SUITE_SIZES = os.environ.get("BENCH_SIZES", "16M").split(",")


@functools.cache
def cases_for(size: str):
    return {c.name: c for c in [bandwidth_case()] + all_cases(SIZES[size], small=size == "16M")}


def params(group: str) -> list[tuple[str, str]]:
    """(size, case name) pairs of one group, for pytest.mark.parametrize."""
    names = {"bandwidth": ["in-place x.mul_(c) (bandwidth reference)"],
             "adamw": ["torch AdamW fused=True", "torch AdamW foreach=True"]}
    out = []
    for size in SUITE_SIZES:
        if group in names:
            out += [(size, n) for n in names[group]]
        else:
            out += [(size, n) for n, c in cases_for(size).items() if c.group == group]
    return out


def run(benchmark, size: str, name: str, rounds: int = 5):
    case = cases_for(size)[name]
    benchmark.extra_info.update(bytes_per_param=case.bytes_per_param, numel=case.numel,
                                state_bytes_per_param=case.state_bytes_per_param)
    benchmark.pedantic(case.run, rounds=case.rounds or rounds, iterations=1, warmup_rounds=1)
