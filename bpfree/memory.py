"""Activation memory of one training step: the peak of tensor memory allocated during the step above what was
allocated before it (activations, saved tensors, tangents, gradients), the figure that grows with depth.

On CUDA it is the caching allocator's peak; on CPU, where PyTorch keeps no allocator statistics, it is summed from
the profiler's record of every tensor allocation and free, which is exact and deterministic (a test can bound it),
but slows the measured step: measure one step, not every step.
"""

from __future__ import annotations

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
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
    live = peak = 0
    # An event's own allocations minus frees, in the order the events started: the running sum is the live bytes.
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return result, peak


def activation_peak(step: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Bytes: the peak of tensor memory during `step()` above the memory allocated when it started."""
    return measured(step, device)[1]


def measured_step(estimator: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[Any, float]:
    """`estimator.step(x, y)`'s result and its activation peak in MiB (gradients included; no optimizer step)."""
    result, peak = measured(lambda: estimator.step(x, y), x.device)
    return result, peak / 2**20
