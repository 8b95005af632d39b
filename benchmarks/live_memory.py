"""The allocator's view of a training step's memory: bytes of live CPU tensors over time, and where
the peak sits (benchmarks/peak_memory.py, measure "live").

Why next to RSS: CPU tensors come straight from glibc malloc, which keeps freed heap pages (its
mmap threshold rises to the largest block freed, up to 32 MiB, so after the first step most
activations live on the heap and are not returned), and the peak RSS of one step moves by +-15 MiB
from run to run with the heap's layout. The sum of live tensor bytes has neither effect: it is
what the step holds, deterministic for a given model and batch.

How: torch's profiler with profile_memory reports every CPU tensor allocation and free made while
it runs (c10's ProfiledCPUMemoryReporter), in order, with its size. The running sum over one step
plus the bytes of the tensors alive when the step starts (every torch.Tensor the garbage collector
knows, by unique storage: parameters, optimizer state, codes, the batches) is the live total at
every moment. record_function("phase:...") ranges name the part of the step (forward, backward,
step, reference) and the profiler's own op events name the op running at the peak.
"""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

MIB = 2**20


def python_tensor_bytes() -> int:
    """Bytes of every storage referenced by a torch.Tensor the garbage collector tracks, each once."""
    gc.collect()
    seen: dict[int, int] = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type == "cpu" and not o.is_sparse:
            try:
                s = o.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            if s.data_ptr():
                seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def saved_activation_bytes(forward) -> tuple[object, int]:
    """Runs forward() recording every tensor autograd saves for the backward; returns its result
    and the bytes of those saved tensors' storages, each once, parameters left out."""
    params = {p.untyped_storage().data_ptr() for o in gc.get_objects() if isinstance(o, torch.nn.Parameter)
              for p in (o,)}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() and s.data_ptr() not in params and t.device.type == "cpu":
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(seen.values())


def phase(name: str):
    """Marks a part of the step for the timeline (a no-op cost when no profiler runs)."""
    return record_function(f"phase:{name}")


class LiveTimeline:
    """Profiles the live CPU tensor bytes of what runs inside `with timeline.record():`."""

    def __init__(self) -> None:
        self.start_bytes = 0
        self._events = []

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        self.start_bytes = python_tensor_bytes()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield
        self._events = list(prof.profiler.kineto_results.events())

    def summary(self) -> dict:
        """Peak live bytes, live bytes at each phase's end, and the phase and op at the peak."""
        mem, spans = [], []
        for e in self._events:
            if e.name() == "[memory]":
                if str(e.device_type()).endswith("CPU"):  # DeviceType.CPU
                    mem.append((e.start_ns(), e.nbytes()))
            else:
                spans.append((e.start_ns(), e.start_ns() + e.duration_ns(), e.name()))
        if not mem:
            raise RuntimeError("live memory: the profiler reported no CPU allocation (profile_memory off?)")
        mem.sort()
        live, peak, peak_t = self.start_bytes, self.start_bytes, mem[0][0]
        at = []
        for t, nbytes in mem:
            live += nbytes
            at.append((t, live))
            if live > peak:
                peak, peak_t = live, t

        def live_at(t: int) -> int:
            out = self.start_bytes
            for tt, v in at:
                if tt > t:
                    break
                out = v
            return out

        def innermost(prefix: str | None, exclude: str | None = None) -> str:
            inside = [s for s in spans if s[0] <= peak_t <= s[1]
                      and (prefix is None or s[2].startswith(prefix))
                      and (exclude is None or not s[2].startswith(exclude))]
            return min(inside, key=lambda s: s[1] - s[0])[2] if inside else ""

        phases = {}
        for start, end, name in sorted(s for s in spans if s[2].startswith("phase:")):
            key = name.removeprefix("phase:")
            peak_in = max((v for t, v in at if start <= t <= end), default=live_at(start))
            phases[key] = dict(end_mib=round(live_at(end) / MIB, 1), peak_mib=round(peak_in / MIB, 1))
        node = innermost("autograd::engine::evaluate_function")
        return dict(start_mib=round(self.start_bytes / MIB, 1), peak_mib=round(peak / MIB, 1),
                    end_mib=round(live / MIB, 1), peak_phase=innermost("phase:").removeprefix("phase:"),
                    peak_node=node.removeprefix("autograd::engine::evaluate_function: "),
                    peak_op=innermost("aten::"), phases=phases)
