"""Backpropagation: the reference every other estimator is tested against."""

from __future__ import annotations

import torch

from bpfree.methods import METHODS
from bpfree.methods.base import Estimator, StepResult


@METHODS.register("bp", "backpropagation of the global loss (the reference)", paper="Rumelhart et al. 1986")
class Backprop(Estimator):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward pass whose autograd graph `step` differentiates (feedback alignment swaps its backward)."""
        return self.model(x)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        params = self.trainable()
        logits = self.forward(x)
        loss = self.loss_fn(logits, y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        return StepResult(loss.detach(), logits.detach())
