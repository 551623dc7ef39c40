"""Activation memory of one training step: the peak of tensor memory allocated during the step above what was
allocated before it (activations, saved tensors, tangents, gradients), the figure that grows with depth.

On CUDA it is the caching allocator's peak; on CPU, where PyTorch keeps no allocator statistics, it is summed from
the profiler's record of every tensor allocation and free, which is exact and deterministic (a test can bound it),
but slows the measured step: measure one step, not every step.
"""

from __future__ import annotations

import os
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
