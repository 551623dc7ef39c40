"""A second learning rule for the compare tests, which must not depend on other branches' methods.

`test-slow-bp` is backprop (exact gradients) that sleeps `BPFREE_TEST_DELAY` seconds per step, so that a
subprocess can be killed mid-run reliably; it declares a `tangents` option (unused) to test option routing.
"""

from __future__ import annotations

import os
import time

import torch

from bpfree.core.registry import Option
from bpfree.methods import METHODS
from bpfree.methods.base import StepResult
from bpfree.methods.bp import Backprop

NAME = "test-slow-bp"


class SlowBackprop(Backprop):
    delay = float(os.environ.get("BPFREE_TEST_DELAY", "0"))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        if self.delay:
            time.sleep(self.delay)
        return super().step(x, y)


def register() -> None:
    if NAME not in METHODS.entries:
        METHODS.register(NAME, "backprop, slowed down (tests only)",
                         options={"tangents": Option(1, "unused; tests option routing")})(SlowBackprop)


def unregister() -> None:
    METHODS.entries.pop(NAME, None)
