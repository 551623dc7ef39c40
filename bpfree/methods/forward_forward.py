"""Forward-Forward (Hinton 2022) and Scalable Forward-Forward (Krutsylo 2025): every layer / block learns from
its own local objective and no gradient crosses a layer or block boundary.

`ff`: positive data = image with its true label one-hot in the input, negative data = the same image with a
wrong label (never the true one). Each layer's goodness G = (mean or sum of) squared ReLU activities, and each
layer minimises its own loss on its (detached, length-normalised) input. Hinton's loss (`--loss logistic`) is
p(positive) = sigma(G - theta) on each pass. The default recipe differs in three measured ways (MNIST 3x500,
10k images, 4 epochs: 33.1 % test error -> 6.8 %; see benchmarks/ff_recipe.py): hard negatives (the wrong
label drawn from the network's own goodness softmax, as Hinton suggests), the contrast loss
softplus(-s (G_pos - G_neg)) on each example's positive/negative pair (with the logistic loss the third layer
of 3x500 did not learn at all in 4 epochs), and a label overlay of 3 instead of 1 (standardised MNIST pixels
reach 2.8, so a label of 1 is a faint signal).

`sff` / `sff-block`: no label in the input and no negative pass. Each unit (a conv layer for `sff`, a natural
block such as a ResNet basic block for `sff-block`) gets a 1x1-conv head with one channel per class; goodness
of class c = mean squared activation of channel c; unit loss = cross-entropy over the goodness vector.
Backprop runs inside a unit only: its output is layer-normalised and detached before the next unit.

Design choice for the SFF heads: they belong to the estimator (the model stays the plain network that `bp`
trains), `trainable()` returns the blocks' parameters plus the heads' parameters, so the trainer's optimizer
updates both, and the heads are saved in the estimator's `state_dict()`. The model's own classifier
(`head`) is not used by SFF and is left out of `trainable()`.
`--init-from` therefore naturally gives new heads.

Each unit's gradient is taken right after its forward pass (autograd.grad on that unit's loss), so a unit's
graph is freed before the next unit runs: peak activation memory is one unit's, not the network's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.errors import DivergedError, UsageError
from bpfree.methods import METHODS
from bpfree.methods.base import Estimator, StepResult
from bpfree.models.ff_mlp import FFMLP, length_normalise
from bpfree.registry import Option


def _set_grads(params: list[nn.Parameter], grads: dict[nn.Parameter, torch.Tensor]) -> None:
    """Overwrite `.grad` of every parameter: its local gradient, or zeros where the rule gives nothing."""
    for p in params:
        g = grads.get(p)
        p.grad = torch.zeros_like(p) if g is None else g


def _accumulate(
    grads: dict[nn.Parameter, torch.Tensor], loss: torch.Tensor, params: list[nn.Parameter]
) -> None:
    for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
        if g is not None:
            grads[p] = grads[p] + g if p in grads else g


# ----------------------------------------------------------------------------------------------------
# Forward-Forward (Hinton 2022)


@METHODS.register(
    "ff",
    "Forward-Forward: per-layer goodness of positive (true label) vs negative (wrong label) data",
    options={
        "loss": Option(
            "contrast",
            "contrast: softplus(-contrast_scale * (G_pos - G_neg)), each example's positive pass against its "
            "own negative, no threshold (symmetric in the two passes; SymBa-style); logistic: Hinton's "
            "p(positive) = sigma(G - threshold) on each pass separately",
            choices=("contrast", "logistic"),
        ),
        # MNIST 3x500, 10k images, 4 epochs, hard negatives, test error by scale: 4: 8.6 %, 10: 7.7 %, 20: 7.9 %,
        # 50: 6.8 %, 200: 7.5 % (2,000 test images, sd ~0.6 %); the deepest layer learns faster at larger scale.
        "contrast_scale": Option(50.0, "inverse temperature of the contrast loss, in units of the goodness form"),
        "threshold": Option(
            1.0, "logistic loss: theta per unit (the sum form compares G with threshold * layer width)"
        ),
        # sum and mean rank labels identically; they differ in the logistic's temperature (layer width). With
        # the literal sum the logits are O(width): on digits (3x200, Adam lr 1e-3 / 1e-4, 15 epochs) accuracy
        # stayed below 25 %, while mean reached 89 % at lr 1e-2; on MNIST (2x500, 10k images, 3 epochs) sum
        # with Adam ranked the true label last. Hence mean by default.
        "goodness": Option(
            "mean",
            "G = mean of squared activities, or 'sum' (Hinton's literal form; with the logistic loss "
            "p = sigma(sum of squares - threshold * width))",
            choices=("mean", "sum"),
        ),
        "negatives": Option(
            "hard",
            "hard: the wrong label drawn in proportion to the softmax of the network's own goodness over the "
            "wrong labels (in the sum scale: nearly always the most confusable one; C extra no-grad forward "
            "passes per step, which also give the goodness prediction for train_error); random: uniform over "
            "the other classes; readout: in proportion to the readout's softmax over the wrong classes (free)",
            choices=("hard", "random", "readout"),
        ),
        "peer_norm": Option(
            0.0,
            "weight of the peer-normalisation loss: pulls each unit's running mean activity on positive data "
            "(momentum 0.9) towards the layer's mean, so no unit stays dead or dominates; 0 turns it off",
        ),
        "input_dropout": Option(
            0.0,
            "training only: drop this fraction of every layer's input (the label entries excepted), scaling the "
            "rest by 1/(1-p); an example's positive and negative pass share one mask, so they differ only in the "
            "label; a regulariser (the recipe fits MNIST's training set in ~10 epochs); 0 turns it off",
        ),
        "greedy_steps": Option(
            0,
            "0: all layers learn every step; N > 0: greedy layer-by-layer, layer l learns "
            "only during steps [l*N, (l+1)*N) and the last layer from then on",
        ),
        "inference": Option(
            "goodness",
            "predict by overlaying each label and summing goodness of all layers but the first, or by the "
            "linear readout on normalised activities (neutral label). Training metrics: train_error is the "
            "error of this inference on each batch before its update when the step has it (goodness with "
            "hard negatives, or readout), else the readout's; readout_error is always the readout's; "
            "pair_error: how often the negative's goodness reached the positive's",
            choices=("goodness", "readout"),
        ),
    },
    paper="Hinton 2022, The Forward-Forward Algorithm: Some Preliminary Investigations",
)
class ForwardForward(Estimator):
    """Trains an `ff-mlp`. The readout layer is always trained too (cross-entropy on detached, normalised
    activities under the neutral label), so `--inference readout` works on any trained network."""

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        if not isinstance(model, FFMLP):
            raise UsageError("method 'ff' needs the 'ff-mlp' model (the label is part of its input)")
        super().__init__(model, seed=seed, **options)
        if not 0.0 <= self.options["input_dropout"] < 1.0:
            raise UsageError(f"ff: --input-dropout must be in [0, 1), got {self.options['input_dropout']}")
        self.steps = 0
        self.running_means: dict[int, torch.Tensor] = {}  # peer normalisation: per layer, per unit

    @property
    def net(self) -> FFMLP:
        return self.model  # type: ignore[return-value]

    def negative_labels(
        self, x: torch.Tensor, y: torch.Tensor, scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A wrong label per example; never equal to `y` by construction.

        `scores` ([B, C], higher = more plausible) drive 'hard' and 'readout' sampling; computed here if absent.
        """
        classes = self.net.num_classes
        mode = self.options["negatives"]
        if mode == "random":
            offset = torch.randint(1, classes, y.shape, generator=self.generator, device=y.device)
            return (y + offset) % classes
        if scores is None:
            with torch.no_grad():
                scores = self.goodness_scores(x) if mode == "hard" else self.net(x)
        scores = scores.detach().float().clone()
        scores[torch.arange(len(y), device=y.device), y] = -math.inf
        probs = torch.softmax(scores - scores.amax(1, keepdim=True), dim=1)
        if not torch.isfinite(probs).all():  # goodness overflowed (lr far too high): nothing sensible to sample
            raise DivergedError("goodness scores became NaN/inf (sampling hard negatives)")
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)

    def active_layers(self) -> range:
        n = len(self.net.layers)
        every = self.options["greedy_steps"]
        if every <= 0:
            return range(n)
        current = min(self.steps // every, n - 1)
        return range(current, current + 1)

    def layer_logits(self, acts: torch.Tensor) -> torch.Tensor:
        """Goodness minus threshold, in the mean or the sum (x layer width) scale."""
        goodness = acts.pow(2).sum(dim=1)
        if self.options["goodness"] == "mean":
            return goodness / acts.shape[1] - self.options["threshold"]
        return goodness - self.options["threshold"] * acts.shape[1]

    def layer_loss(self, acts: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """One layer's loss; `acts` holds the positive passes first, then the negatives in the same order."""
        logits = self.layer_logits(acts)
        if self.options["loss"] == "contrast":
            half = len(logits) // 2  # the threshold cancels in the difference
            return F.softplus(self.options["contrast_scale"] * (logits[half:] - logits[:half])).mean()
        # softplus(theta - G) on positives, softplus(G - theta) on negatives
        return F.binary_cross_entropy_with_logits(logits, positive)

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
        grads: dict[nn.Parameter, torch.Tensor] = {}
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
                    _accumulate(grads, loss, list(layer.parameters()))
            if index > 0 or len(net.layers) == 1:
                good = acts.detach().pow(2).sum(dim=1)
                margin += good[:batch] - good[batch:]
            # The next layer sees only the direction of this activity and no gradient flows back through it.
            h = length_normalise(acts.detach())
        with torch.enable_grad():
            readout_loss = F.cross_entropy(net.readout(features), y)
        _accumulate(grads, readout_loss, list(net.readout.parameters()))
        _set_grads(self.trainable(), grads)
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

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps": self.steps, "running_means": dict(self.running_means)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps = int(state.get("steps", 0))
        self.running_means = dict(state.get("running_means", {}))


# ----------------------------------------------------------------------------------------------------
# Scalable Forward-Forward (Krutsylo 2025)

SFF_OPTIONS = {
    "inference": Option(
        "mean",
        "average the goodness vectors of all units, or use the last unit's only",
        choices=("mean", "last"),
    ),
    "norm": Option(
        "layer", "normalisation of a unit's output before the (detached) next unit", choices=("layer", "none")
    ),
}
SFF_PAPER = "Krutsylo 2025, Scalable Forward-Forward Algorithm (arXiv 2501.03176)"

Visit = Callable[[int, torch.Tensor, nn.Module], None]


class ScalableFF(Estimator):
    """Wraps a model exposing `blocks` (an ordered nn.ModuleList) without changing it."""

    layerwise = False

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UsageError("sff needs a model that exposes its blocks (e.g. resnet18, mobilenetv3-small)")
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise UsageError("sff needs the model's input_shape attribute to size its heads")
        super().__init__(model, seed=seed, **options)
        self.blocks = blocks
        param = next(model.parameters())
        # A dry run (eval mode, no grad: BN statistics untouched) finds each unit's channels and the classes.
        channels: list[int] = []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            dummy = torch.zeros(2, *input_shape, device=param.device, dtype=param.dtype)
            self.num_classes = int(model(dummy).shape[1])
            self._run(dummy, lambda k, h, b: channels.append(h.shape[1]))
        model.train(was_training)
        self.heads = nn.ModuleList(nn.Conv2d(c, self.num_classes, 1) for c in channels).to(
            param.device, param.dtype
        )
        with torch.no_grad():  # seeded like every other random draw of an estimator
            for head in self.heads:
                bound = 1 / math.sqrt(head.in_channels)
                for p in head.parameters():
                    u = torch.rand(p.shape, generator=self.generator, device=p.device, dtype=p.dtype)
                    p.copy_((2 * u - 1) * bound)

    def _norm(self, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, h.shape[1:]) if self.options["norm"] == "layer" else h

    def _run(self, x: torch.Tensor, visit: Visit) -> None:
        """Forward through all units; `visit(k, out, block)` sees unit k's raw output (graph attached)."""
        index = 0
        h = x

        def end_unit(out: torch.Tensor) -> torch.Tensor:
            nonlocal index
            visit(index, out, block)
            index += 1
            return self._norm(out).detach()  # no gradient crosses this boundary

        for block in self.blocks:  # noqa: B007 (end_unit reads the current block)
            if self.layerwise and getattr(block, "splittable", False):
                out = block(h, between=end_unit)
            else:
                out = block(h)
            h = end_unit(out)

    def goodness(self, k: int, out: torch.Tensor) -> torch.Tensor:
        """[B, C]: mean over positions of the squared activations of head k's channel c."""
        if out.dim() == 2:
            out = out[:, :, None, None]
        return self.heads[k](out).pow(2).mean(dim=(2, 3))

    def combine(self, goodness: list[torch.Tensor]) -> torch.Tensor:
        if self.options["inference"] == "last":
            return goodness[-1]
        return torch.stack(goodness).mean(dim=0)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        grads: dict[nn.Parameter, torch.Tensor] = {}
        goods: list[torch.Tensor] = []
        losses: list[torch.Tensor] = []

        def visit(k: int, out: torch.Tensor, block: nn.Module) -> None:
            g = self.goodness(k, out)
            loss = F.cross_entropy(g, y)
            # Only this unit's block and head can be in the graph (the unit's input was detached); taking the
            # gradient now frees the unit's graph before the next unit runs.
            params = [p for p in block.parameters() if p.requires_grad] + list(self.heads[k].parameters())
            _accumulate(grads, loss, params)
            goods.append(g.detach())
            losses.append(loss.detach())

        self._run(x, visit)
        _set_grads(self.trainable(), grads)
        extra = {f"loss_unit{k}": loss.item() for k, loss in enumerate(losses)}
        return StepResult(torch.stack(losses).mean(), self.combine(goods), extra)

    def unit_losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Each unit's loss with its graph attached (for tests and analysis; `step` is the training path)."""
        losses: list[torch.Tensor] = []
        self._run(x, lambda k, out, b: losses.append(F.cross_entropy(self.goodness(k, out), y)))
        return losses

    def unit_goodness(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each unit's [B, C] goodness vector, without gradients (what `predict` combines)."""
        goods: list[torch.Tensor] = []
        with torch.no_grad():
            self._run(x, lambda k, out, b: goods.append(self.goodness(k, out)))
        return goods

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.unit_goodness(x))

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.blocks.parameters() if p.requires_grad] + list(self.heads.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "heads": self.heads.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "heads" in state:
            self.heads.load_state_dict(state["heads"])


@METHODS.register(
    "sff",
    "Scalable Forward-Forward, layer-wise: every conv layer learns from its own 1x1-conv goodness head",
    options=SFF_OPTIONS,
    paper=SFF_PAPER,
)
class ScalableFFLayerwise(ScalableFF):
    layerwise = True


@METHODS.register(
    "sff-block",
    "Scalable Forward-Forward, block-wise hybrid: backprop inside each natural block, nothing across blocks",
    options=SFF_OPTIONS,
    paper=SFF_PAPER,
)
class ScalableFFBlock(ScalableFF):
    layerwise = False
