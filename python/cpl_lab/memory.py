"""Peak memory of one cell, and what the number means.

On CUDA: torch.cuda.max_memory_allocated (tensors only), reset per cell. On CPU torch keeps no
allocator statistics, and tracemalloc does not see tensor memory, so the lab reports the process's
peak resident set (VmHWM), reset per cell by writing 5 to /proc/self/clear_refs (Linux). It
includes Python, torch and the data (a few hundred MB), so compare methods by their differences.
Where the reset is refused the number is the process-lifetime peak, and the kind says so.
"""
from __future__ import annotations

import resource

import torch


def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakMemory:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.kind = "cuda max_memory_allocated"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "peak RSS (VmHWM, reset per cell)"
        except OSError:
            self.kind = "peak RSS (process lifetime)"

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        hwm = _vm_hwm_mb()
        if hwm is not None:
            return hwm
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
