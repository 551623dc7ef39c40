"""ff-mlp's fast path for `ff` (Hinton 2022): the label is part of the model's input (`FFMLP.with_label`), and the
label's share of the first layer is computed once for all labels in goodness inference (`activities_per_label`).
The generic rule for any block-structured classifier: `bpfree.methods.forward_forward.BlockForwardForward`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.core.errors import UsageError
from bpfree.methods import register_fast_path
from bpfree.methods.base import Buffers, Estimator, StepResult, add_grads, zero_missing_grads
from bpfree.methods.forward_forward import goodness_logits, pair_loss, wrong_labels
from bpfree.models.ff_mlp import FFMLP, length_normalise


@register_fast_path("ff", FFMLP)
class ForwardForward(Estimator):
    """Trains an `ff-mlp`. The readout layer is always trained too (cross-entropy on detached, normalised
    activities under the neutral label), so `--inference readout` works on any trained network."""

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        if not isinstance(model, FFMLP):
            raise UsageError("method 'ff' needs the 'ff-mlp' model (the label is part of its input)")
        super().__init__(model, seed=seed, **options)
        if not 0.0 <= self.options["input_dropout"] < 1.0:
            raise UsageError(f"ff: --input-dropout must be in [0, 1), got {self.options['input_dropout']}")
        self.parts.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.running_means = self.parts.running_means = Buffers()  # peer normalisation: per layer, per unit

    @property
    def steps(self) -> int:
        return int(self.parts.step_count)

    @steps.setter
    def steps(self, value: int) -> None:
        self.parts.step_count.fill_(value)

    @property
    def net(self) -> FFMLP:
        return self.model  # type: ignore[return-value]

    def negative_labels(
        self, x: torch.Tensor, y: torch.Tensor, scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A wrong label per example; never equal to `y` by construction.

        `scores` ([B, C], higher = more plausible) drive 'hard' and 'readout' sampling; computed here if absent.
        """
        mode = self.options["negatives"]
        if mode != "random" and scores is None:
            with torch.no_grad():
                scores = self.goodness_scores(x) if mode == "hard" else self.net(x)
        return wrong_labels(y, self.net.num_classes, None if mode == "random" else scores, self.generator)

    def active_layers(self) -> range:
        n = len(self.net.layers)
        every = self.options["greedy_steps"]
        if every <= 0:
            return range(n)
        current = min(self.steps // every, n - 1)
        return range(current, current + 1)

    def layer_logits(self, acts: torch.Tensor) -> torch.Tensor:
        """Goodness minus threshold, in the mean or the sum (x layer width) scale."""
        o = self.options
        return goodness_logits(acts.pow(2).sum(dim=1), acts.shape[1], o["goodness"], o["threshold"])

    def layer_loss(self, acts: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """One layer's loss; `acts` holds the positive passes first, then the negatives in the same order."""
        return pair_loss(self.layer_logits(acts), positive, self.options["loss"], self.options["contrast_scale"])

    def peer_loss(self, index: int, acts: torch.Tensor) -> torch.Tensor:
        """Mean over units of (layer mean of the running means - the unit's running mean)^2.

        The running mean (momentum 0.9, positive data only) carries this batch's term with its graph; older
        batches enter as constants.
        """
        batch_mean = acts.mean(dim=0)
        old = self.running_means.get(index)
        running = batch_mean if old is None else 0.9 * old + 0.1 * batch_mean
        self.running_means[index] = running.detach()
        return (running.mean() - running).pow(2).mean()

    def dropout_scale(self, batch: int, width: int, first: bool) -> torch.Tensor:
        """[batch, width] input-dropout multipliers (0 or 1/(1-p)); the first layer's label entries are kept."""
        p = self.options["input_dropout"]
        scale = (torch.rand(batch, width, generator=self.generator, device=self.generator.device) >= p).float()
        scale /= 1.0 - p
        if first:  # the label entries come first in both label layouts; dropping them would erase the task
            scale[:, : self.net.num_classes] = 1.0
        return scale

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        net, classes, batch = self.net, self.net.num_classes, x.shape[0]
        # Readout on the normalised activities of the neutral-label pass; features carry no gradient. It runs
        # first so that 'readout' negatives can use its prediction.
        with torch.no_grad():
            features = net.readout_features(net.activities(net.with_label(x, net.neutral(x))))
            readout_logits = net.readout(features)
            scores = self.goodness_scores(x) if self.options["negatives"] == "hard" else readout_logits
        y_neg = self.negative_labels(x, y, scores)
        h = torch.cat(
            [net.with_label(x, F.one_hot(y, classes)), net.with_label(x, F.one_hot(y_neg, classes))]
        )
        positive = torch.cat([x.new_ones(batch), x.new_zeros(batch)])
        active = self.active_layers()
        params = self.trainable()
        for p in params:
            p.grad = None
        extra: dict[str, float] = {}
        losses = []
        margin = x.new_zeros(batch)  # positive minus negative goodness, layers as in goodness inference
        peer = self.options["peer_norm"]
        for index, layer in enumerate(net.layers):
            if index > active[-1]:
                break  # greedy schedule: later layers are not trained yet
            learn = index in active
            if self.options["input_dropout"] > 0:  # one mask per example, shared by its two passes
                h = h * self.dropout_scale(batch, h.shape[1], first=index == 0).to(h.dtype).repeat(2, 1)
            with torch.set_grad_enabled(learn):
                acts = torch.relu(layer(h))
                if learn:
                    loss = self.layer_loss(acts, positive)
                    losses.append(loss.detach())
                    extra[f"loss_layer{index}"] = loss.item()
                    if peer > 0:
                        loss = loss + peer * self.peer_loss(index, acts[:batch])
                    add_grads(loss, list(layer.parameters()))
            if index > 0 or len(net.layers) == 1:
                good = acts.detach().pow(2).sum(dim=1)
                margin += good[:batch] - good[batch:]
            # The next layer sees only the direction of this activity and no gradient flows back through it.
            h = length_normalise(acts.detach())
        with torch.enable_grad():
            readout_loss = F.cross_entropy(net.readout(features), y)
        add_grads(readout_loss, list(net.readout.parameters()))
        zero_missing_grads(params)
        self.steps += 1
        extra["loss_readout"] = readout_loss.item()
        extra["readout_error"] = 100.0 * (readout_logits.argmax(1) != y).float().mean().item()
        extra["pair_error"] = 100.0 * (margin <= 0).float().mean().item()
        # The trainer's train_error comes from these logits: the method's own inference when the step has it.
        goodness_known = self.options["inference"] == "goodness" and self.options["negatives"] == "hard"
        logits = scores if goodness_known else readout_logits
        return StepResult(torch.stack(losses).mean(), logits.detach(), extra)

    def goodness_scores(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C]: for every label c, goodness summed over all layers but the first with c overlaid.

        Each example gets the fixed one-hot of c, so its score never depends on the rest of the batch.
        """
        acts = self.net.activities_per_label(x)
        used = acts[1:] if len(acts) > 1 else acts
        return sum(a.pow(2).sum(dim=-1) for a in used).t()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.options["inference"] == "readout":
                return self.net(x)
            return self.goodness_scores(x)

    def reduced_state(self) -> list[torch.Tensor]:
        return list(self.running_means)  # made in layer order alike on every rank
