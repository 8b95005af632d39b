"""pytest collects the suites here (bench_*.py) only when pointed at benchmarks/: `pytest tests`
never sees them (pyproject's testpaths = tests, and this hook lives under benchmarks/ only).
Run: python -m pytest benchmarks/ --benchmark-only"""
import pytest
import torch


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    torch.set_num_threads(2)
