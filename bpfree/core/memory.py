"""Activation memory of one training step: the peak of tensor memory allocated during the step above what was
allocated before it (activations, saved tensors, tangents, gradients), the figure that grows with depth.

On CUDA it is the caching allocator's peak; on CPU, where PyTorch keeps no allocator statistics, it is summed from
the profiler's record of every tensor allocation and free, which is exact and deterministic (a test can bound it),
but slows the measured step: measure one step, not every step.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

T = TypeVar("T")


def measured(step: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, int]:
    """`step()`'s result, and the peak of tensor memory (bytes) during it above the memory allocated when it
    started."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = step()
        torch.cuda.synchronize(device)
        return result, max(0, torch.cuda.max_memory_allocated(device) - before)
    # torch 2.13's profiler library logs two lines ("USDT: ... profiler_start") per profiled step on stderr unless
    # its level is above them; read when it first starts, and a level the user set stands.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
    live = peak = 0
    # Every allocation (+bytes) and free (−bytes) is a record of its own, with its own time: in time order, the
    # running sum is the live bytes. (An operator's net memory, placed at the operator's start, would count a free
    # made inside it, after its children's allocations, before them.)
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for record in sorted(records, key=lambda e: e.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    return result, peak


def activation_peak(step: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Bytes: the peak of tensor memory during `step()` above the memory allocated when it started."""
    return measured(step, device)[1]


def measured_step(estimator: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[Any, float]:
    """`estimator.step(x, y)`'s result and its activation peak in MiB (gradients included; no optimizer step)."""
    result, peak = measured(lambda: estimator.step(x, y), x.device)
    return result, peak / 2**20


def keep_cpu_heap() -> bool:
    """Ask glibc's malloc to keep freed memory for the next step instead of handing it back to the system: True if
    it took the settings.

    By default glibc gives the top of its heap back once enough of it is free, and batch-sized tensors above its
    (adaptive) mmap threshold are mapped and unmapped each time; every page of either is faulted in and zeroed again
    on the next step. A training step frees and reallocates the same sizes every time, so keeping them saves that
    work (docs/models.md: page faults). The process's resident memory then stays at its peak, as PyTorch's CUDA
    allocator keeps it on the GPU. Settings the user gave (MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_) stand;
    elsewhere than glibc on Linux nothing changes.
    """
    if not sys.platform.startswith("linux") or any(k in os.environ for k in MALLOC_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # mallopt's parameters: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3 (malloc.h); it returns 1 on success
    return bool(mallopt(-3, MMAP_THRESHOLD)) and bool(mallopt(-1, TRIM_THRESHOLD))


MALLOC_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
MMAP_THRESHOLD = 32 << 20  # glibc's largest: allocations below it come from the heap, which is kept
TRIM_THRESHOLD = 2**31 - 1  # bytes free at the heap's top before glibc gives them back: in effect, never
