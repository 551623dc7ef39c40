"""Activation memory of one training step: the peak of tensor memory allocated during the step above what was
allocated before it (activations, saved tensors, tangents, gradients), the figure that grows with depth.

On CUDA it is the caching allocator's peak; on CPU, where PyTorch keeps no allocator statistics, it is summed from
the profiler's record of every tensor allocation and free, which is exact and deterministic (a test can bound it),
but slows the measured step: measure one step, not every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def _cpu_peak(step: Callable[[], Any]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    # An event's own allocations minus frees, in the order the events started: the running sum is the live bytes.
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def activation_peak(step: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Bytes: the peak of tensor memory during `step()` above the memory allocated when it started."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    return _cpu_peak(step)


def step_peak_mb(estimator: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """MiB: the activation peak of one `estimator.step(x, y)` (gradients included; the optimizer step is not)."""
    return activation_peak(lambda: estimator.step(x, y), x.device) / 2**20
