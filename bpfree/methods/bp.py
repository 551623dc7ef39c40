"""Backpropagation: the reference every other estimator is tested against."""

from __future__ import annotations

from typing import Any

import torch

from bpfree.core.errors import UsageError
from bpfree.core.registry import Option
from bpfree.methods import METHODS
from bpfree.methods.base import Estimator, StepResult, set_grads

OPTIONS = {
    "objective": Option(
        "supervised",
        "global loss: cross-entropy, or contrastive (localmixer-* only: SimCLR on the last block's projection "
        "head through every block, linear-probe readout; the BP row of Ren et al.'s Table 4)",
        choices=("supervised", "contrastive"),
    ),
    "temperature": Option(0.5, "NT-Xent temperature (contrastive objective)"),
}


@METHODS.register("bp", "backpropagation of the global loss (the reference)", options=OPTIONS,
                  paper="Rumelhart et al. 1986")
class Backprop(Estimator):
    #: Whether this estimator has the contrastive objective (LocalMixer's fast path does).
    contrastive_objective = False

    def __init__(self, model: torch.nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed, **options)
        self.contrastive = self.options.get("objective") == "contrastive"  # declared by LocalMixer's bp only
        self.temperature = self.options.get("temperature", 0.5)
        if self.contrastive and not self.contrastive_objective:
            raise UsageError("bp --objective contrastive needs a localmixer-* model with --head-dim 128")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward pass whose autograd graph `step` differentiates (feedback alignment swaps its backward)."""
        return self.model(x)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        params = self.trainable()
        logits = self.forward(x)
        loss = self.loss_fn(logits, y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        set_grads(params, grads)
        return StepResult(loss.detach(), logits.detach())
