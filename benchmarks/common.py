"""Shared helpers of the benchmark suite: timing, peak memory, load average, result records.

Timing. Every benchmark times its variants side by side in one process: the variants run
round-robin (a, b, c, a, b, c, …) after a warm-up, so a change of machine load during the run
hits all of them alike. Each measurement keeps every sample plus its median and minimum.

Peak memory (CPU). ``tracemalloc`` does not see torch's CPU allocations, so two other methods
are used, both on one extra step run after the timed ones:

- ``torch_profiler_alloc`` (the primary number): ``torch.profiler`` with
  ``profile_memory=True`` records every allocation and free of torch's CPU allocator together
  with the running total of bytes allocated. The peak of that total during the step, minus its
  value when the step starts, is the largest amount of extra tensor memory alive at once.
  It counts every tensor the step creates (autograd buffers, gradients, temporaries), and
  nothing else: Python objects, numpy arrays and allocator slack are not included.
- ``rss_high_water`` (a cross-check): the kernel's resident-set high-water mark ``VmHWM`` of
  ``/proc/self/status`` is reset to the current RSS by writing ``5`` to
  ``/proc/self/clear_refs`` before the step; after it, ``VmHWM − VmRSS(before)`` is the growth of
  resident memory. It includes everything the process touched, but under-counts allocations
  that reuse memory ``malloc`` already holds (typical for small tensors), so it is a lower bound
  for small steps and close to exact for large ones (large blocks are fresh ``mmap`` pages).

On CUDA the peak is ``torch.cuda.max_memory_allocated`` minus the allocated bytes before.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


class BenchmarkUnavailable(RuntimeError):
    """Raised by a benchmark that cannot run here (missing dependency, not wired yet)."""


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loadavg() -> list[float] | None:
    """``/proc/loadavg`` (1, 5 and 15 minute load averages), or None where it does not exist."""
    try:
        with open("/proc/loadavg") as fh:
            return [float(v) for v in fh.read().split()[:3]]
    except OSError:
        return None


def summarize(samples: list[float], unit: str, scale: float = 1.0) -> dict[str, Any]:
    """Median / min / max of ``samples`` (seconds) in ``unit`` (multiplied by ``scale``)."""
    vals = [s * scale for s in samples]
    return {
        "unit": unit,
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "repeats": len(vals),
        "samples": vals,
    }


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: dict[str, int],
    device: torch.device,
    warmup: int | dict[str, int] = 1,
) -> dict[str, list[float]]:
    """Wall-clock seconds of each call of each function, run round-robin.

    Every function runs ``warmup`` (or ``warmup[name]``) untimed times first; then round ``r``
    times each function whose ``repeats[name] > r``, in the order of ``fns``.
    """
    for name, fn in fns.items():
        for _ in range(warmup if isinstance(warmup, int) else warmup[name]):
            fn()
            sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(max(repeats.values())):
        for name, fn in fns.items():
            if repeats[name] <= r:
                continue
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
    return samples


def _walk(nodes: list[Any]) -> Iterator[Any]:
    for node in nodes:
        yield node
        yield from _walk(node.children)


def torch_alloc_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak extra bytes of torch CPU tensors alive at once during ``fn()`` (profiler method)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.empty(1)  # a first allocation event, to read the starting total
        fn()
    events = []
    for node in _walk(prof.profiler.kineto_results.experimental_event_tree()):
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            events.append((node.start_time_ns, int(fields.alloc_size), int(fields.total_allocated)))
    if not events:
        return 0
    events.sort(key=lambda e: e[0])
    _, first_size, first_total = events[0]
    base = first_total - first_size
    return max(total for _, _, total in events) - base


def _proc_status_kib(keys: tuple[str, ...]) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0])
    return out


def rss_high_water_bytes(fn: Callable[[], object]) -> int | None:
    """Growth of the resident set during ``fn()`` via ``VmHWM`` reset (Linux), else None."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _proc_status_kib(("VmRSS",))["VmRSS"]
        fn()
        after = _proc_status_kib(("VmHWM",))["VmHWM"]
    except (OSError, KeyError):
        return None
    return max(after - before, 0) * 1024


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict[str, Any]:
    """Peak extra memory of one call of ``fn`` with every method available on ``device``."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return {"cuda_max_allocated": torch.cuda.max_memory_allocated(device) - base}
    return {
        "torch_profiler_alloc": torch_alloc_peak_bytes(fn),
        "rss_high_water": rss_high_water_bytes(fn),
    }


def primary_memory_method(device: torch.device) -> str:
    """Key of the peak-memory number used for the memory ratio."""
    return "cuda_max_allocated" if device.type == "cuda" else "torch_profiler_alloc"


MEMORY_METHODS = {
    "torch_profiler_alloc": (
        "torch.profiler(profile_memory=True): peak of the CPU allocator's running total of "
        "allocated tensor bytes during one step, minus its value at the start (every tensor the "
        "step creates, incl. autograd buffers and gradients; no Python objects)"
    ),
    "rss_high_water": (
        "Linux VmHWM reset via /proc/self/clear_refs before the step; VmHWM after minus VmRSS "
        "before. Includes everything resident; under-counts memory reused from malloc's free "
        "lists (small tensors), so it is a lower bound for small steps"
    ),
    "cuda_max_allocated": "torch.cuda.max_memory_allocated after reset, minus allocated before",
}


def target(value: float | None, op: str, bound: float, what: str) -> dict[str, Any]:
    """A target record ``{"value", "target", "met"}``; ``op`` is ``">="`` or ``"<="``."""
    if value is None:
        met = None
    else:
        met = value >= bound if op == ">=" else value <= bound
    return {"what": what, "value": value, "target": f"{op} {bound:g}", "met": met}


def env_threads() -> dict[str, str]:
    """Thread-related environment variables that were set (for the record)."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    return {k: os.environ[k] for k in keys if k in os.environ}


def write_json(path: str | Path, record: dict[str, Any]) -> Path:
    """Write a benchmark record as indented JSON, creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path
