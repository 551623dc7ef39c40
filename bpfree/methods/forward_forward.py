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
reach 2.8, so a label of 1 is a faint signal). That recipe is the `ff-mlp` fast path
(`bpfree.fastpaths.ff_mlp`); `BlockForwardForward` below is the same rule on any block-structured classifier.

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

from bpfree.core.anatomy import boundaries, channels, eval_mode, example_input, init_uniform_, pool, pooled_positions
from bpfree.core.errors import DivergedError, UsageError
from bpfree.core.registry import Option
from bpfree.methods import METHODS
from bpfree.methods.base import Estimator, StepResult, add_grads, zero_missing_grads
from bpfree.methods.block_local import between_parameters

# ----------------------------------------------------------------------------------------------------
# Forward-Forward (Hinton 2022)


FF_PAPER = "Hinton 2022, The Forward-Forward Algorithm: Some Preliminary Investigations"
FF_OPTIONS = {
        "loss": Option(
            "contrast",
            "contrast: softplus(-contrast_scale * (G_pos - G_neg)), each example's positive pass against its "
            "own negative, no threshold (symmetric in the two passes; SymBa-style); logistic: Hinton's "
            "p(positive) = sigma(G - threshold) on each pass separately",
            choices=("contrast", "logistic"),
        ),
        # 50: the best of a small scan (docs/performance.md, "Measured choices").
        "contrast_scale": Option(50.0, "inverse temperature of the contrast loss, in units of the goodness form"),
        "threshold": Option(
            1.0, "logistic loss: theta per unit (the sum form compares G with threshold * layer width)"
        ),
        # sum and mean rank labels identically; they differ in the logistic's temperature (layer width): with the
        # literal sum the logits grow with width and training fails (docs/performance.md, "Measured choices").
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
    }


def goodness_logits(goodness: torch.Tensor, width: int, form: str, threshold: float) -> torch.Tensor:
    """Goodness (sum of squares) minus the threshold, in the mean (÷ width) or the sum (threshold x width) scale."""
    if form == "mean":
        return goodness / width - threshold
    return goodness - threshold * width


def pair_loss(logits: torch.Tensor, positive: torch.Tensor, loss: str, contrast_scale: float) -> torch.Tensor:
    """One layer's loss; `logits` hold the positive passes first, then the negatives in the same order."""
    if loss == "contrast":
        half = len(logits) // 2  # the threshold cancels in the difference
        return F.softplus(contrast_scale * (logits[half:] - logits[:half])).mean()
    # softplus(theta - G) on positives, softplus(G - theta) on negatives
    return F.binary_cross_entropy_with_logits(logits, positive)


def wrong_labels(
    y: torch.Tensor, classes: int, scores: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    """A wrong label per example, never equal to `y`: uniform (scores None) or in proportion to the softmax of
    `scores` ([B, C], higher = more plausible) over the wrong classes."""
    if scores is None:
        offset = torch.randint(1, classes, y.shape, generator=generator, device=y.device)
        return (y + offset) % classes
    scores = scores.detach().float().clone()
    scores[torch.arange(len(y), device=y.device), y] = -math.inf
    probs = torch.softmax(scores - scores.amax(1, keepdim=True), dim=1)
    if not torch.isfinite(probs).all():  # goodness overflowed (lr far too high): nothing sensible to sample
        raise DivergedError("goodness scores became NaN/inf (sampling hard negatives)")
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class Goodness(torch.autograd.Function):
    """[B]: sum over channels of the squared activity, averaged over positions or tokens, with a lean backward.

    Autograd's own chain (sum, mean, pow) makes four block-output-sized temporaries in its backward, and at a
    block boundary they set the step's peak; this backward makes the one the gradient needs. Same bits both ways:
    autograd forms (g / N) x (2 x out), this out x (2 x (g / N)), and doubling is exact.
    """

    @staticmethod
    def forward(out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return pool(out.pow(2)).sum(-1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        n = pooled_positions(out)
        scale = (grad / n if n > 1 else grad) * 2
        return out * scale.view(-1, *([1] * (out.dim() - 1)))


def example_rms_normalise(h: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each example scaled to root-mean-square 1 over all its values: only the direction goes on."""
    return h / (h.pow(2).flatten(1).mean(1).sqrt() + eps).view(-1, *([1] * (h.dim() - 1)))


def batch_statistics(model: nn.Module) -> bool:
    """Whether a batch norm of `model` would normalise with the statistics of the batch it is given (training mode,
    or no running statistics), not per example."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
               for m in model.modules())  # fmt: skip


@METHODS.register("ff", "Forward-Forward: per-block goodness of positive (true label) vs negative (wrong label) data",
                  options=FF_OPTIONS, paper=FF_PAPER)
class BlockForwardForward(Estimator):
    """`ff` on any block-structured classifier (ff-mlp has its own fast path: `bpfree.fastpaths.ff_mlp`).

    Label overlay (keeps the input's shape): the first C values of each flattened example are replaced by 3 x the
    one-hot of the label (the neutral label 1/C for the readout), as Hinton's label in the first pixels of an MNIST
    image. Goodness is measured at every block output: the sum over channels of the squared activity, averaged over
    positions ([B, C, H, W]) or tokens ([B, T, C]) (divided by the channels with `--goodness mean`). Each block's
    output is normalised (root-mean-square 1 per example) and detached where the model's forward continues, so no
    gradient crosses a block and the next block sees only the direction. The model's own readout (the parameters
    after the last block) learns by cross-entropy on the neutral-label pass; parameters between blocks learn from
    the next block's goodness loss. `--peer-norm`, `--input-dropout` and `--greedy-steps` are ff-mlp only.
    Hard negatives and goodness inference overlay every label: one pass over C x B examples.
    """

    label_value = 3.0

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed=seed, **options)
        name = type(model).__name__
        for key in ("peer_norm", "input_dropout", "greedy_steps"):
            if self.options[key]:
                raise UsageError(f"ff --{key.replace('_', '-')}: ff-mlp only, not {name}")
        anatomy = self.anatomy
        if not anatomy.blocks:
            raise UsageError(f"ff needs a model with blocks (goodness is measured at each); {name} has none")
        self.classes = anatomy.num_classes
        if math.prod(anatomy.input_shape) < self.classes:
            raise UsageError(f"ff: an input of {math.prod(anatomy.input_shape)} values cannot hold a "
                             f"{self.classes}-class label")
        between = between_parameters(anatomy)
        self.readout = [p for p in anatomy.readout_parameters() if all(p is not q for q in between)]
        self.local_params = [b.parameters() + between for b in anatomy.blocks]

    def overlay(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """x with its first C values (flattened) replaced by label_value x `label` [B, C]; same shape as x."""
        flat = x.flatten(1)
        return torch.cat([label.to(flat.dtype) * self.label_value, flat[:, self.classes:]], 1).view_as(x)

    def goodness(self, out: torch.Tensor) -> torch.Tensor:
        """[B]: sum over channels of the squared activity, averaged over positions or tokens."""
        return Goodness.apply(out)

    def goodness_logits(self, good: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        o = self.options
        return goodness_logits(good, channels(out.shape[1:]), o["goodness"], o["threshold"])

    def run(self, x: torch.Tensor, visit: Any = None) -> torch.Tensor:
        """The model on labelled inputs x, every block output seen by `visit(i, out)`, normalised and detached."""
        def at(i: int, out: torch.Tensor) -> torch.Tensor:
            if visit is not None:
                visit(i, out)
            return example_rms_normalise(out).detach()

        with boundaries(self.anatomy, at):
            return self.model(x)

    def goodness_scores(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C]: for every label c overlaid, goodness summed over all blocks but the first.

        Two labels per pass (as many examples as a training pass: the scores never hold more activations than the
        step); one pass of C x B where a batch norm normalises with the pass's own statistics, which make the
        examples of a pass depend on each other (in chunks, each chunk would be normalised by its own).
        """
        b, c = x.shape[0], self.classes
        per_pass = c if batch_statistics(self.model) else 2
        eye = torch.eye(c, device=x.device, dtype=x.dtype)
        skip_first = len(self.anatomy.blocks) > 1
        scores = []
        with torch.no_grad():
            for first in range(0, c, per_pass):
                labels = eye[first:first + per_pass]
                labelled = self.overlay(x.repeat(len(labels), *([1] * (x.dim() - 1))), labels.repeat_interleave(b, 0))
                goods: list[torch.Tensor] = []

                def keep(i: int, out: torch.Tensor, goods: list = goods) -> None:
                    if i > 0 or not skip_first:
                        goods.append(self.goodness(out))

                self.run(labelled, keep)
                scores.append(torch.stack(goods).sum(0).view(len(labels), b))
        return torch.cat(scores).t()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        o, batch, c = self.options, x.shape[0], self.classes
        neutral = x.new_full((batch, c), 1.0 / c)
        scores = None
        if o["negatives"] == "hard":
            scores = self.goodness_scores(x)
        elif o["negatives"] == "readout":
            with torch.no_grad():
                scores = self.run(self.overlay(x, neutral))
        y_neg = wrong_labels(y, c, scores, self.generator)
        h = torch.cat([self.overlay(x, F.one_hot(y, c)), self.overlay(x, F.one_hot(y_neg, c))])
        positive = torch.cat([x.new_ones(batch), x.new_zeros(batch)])
        losses: list[torch.Tensor] = []
        margin = x.new_zeros(batch)
        skip_first = len(self.anatomy.blocks) > 1

        def visit(i: int, out: torch.Tensor) -> None:
            nonlocal margin
            good = self.goodness(out)
            loss = pair_loss(self.goodness_logits(good, out), positive, o["loss"], o["contrast_scale"])
            add_grads(loss, self.local_params[i])  # now: block i's graph is freed before block i + 1 runs
            losses.append(loss.detach())
            if i > 0 or not skip_first:
                good = good.detach()
                margin = margin + good[:batch] - good[batch:]

        params = self.trainable()
        for p in params:
            p.grad = None
        with torch.enable_grad():
            self.run(h, visit)
            readout_logits = self.run(self.overlay(x, neutral))
            readout_loss = F.cross_entropy(readout_logits, y)
            add_grads(readout_loss, self.anatomy.readout_parameters())
        zero_missing_grads(params)
        extra = {f"loss_layer{i}": float(v.detach()) for i, v in enumerate(losses)}
        extra["loss_readout"] = float(readout_loss.detach())
        extra["readout_error"] = 100.0 * float((readout_logits.argmax(1) != y).float().mean())
        extra["pair_error"] = 100.0 * float((margin <= 0).float().mean())
        use_scores = o["inference"] == "goodness" and o["negatives"] == "hard"
        logits = scores if use_scores and scores is not None else readout_logits
        return StepResult(torch.stack(losses).mean().detach(), logits.detach(), extra)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.options["inference"] == "readout":
                return self.run(self.overlay(x, x.new_full((x.shape[0], self.classes), 1.0 / self.classes)))
            return self.goodness_scores(x)


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

Visit = Callable[[int, torch.Tensor, list[nn.Parameter]], None]


class ScalableFF(Estimator):
    """Wraps any model with blocks (its anatomy) without changing it.

    Units are the blocks; a unit's output is layer-normalised and detached where the model's own forward continues
    (`bpfree.core.anatomy.boundaries`). Layer-wise `sff` additionally splits blocks that declare `splittable` (a model
    capability: resnet18's and mobilenetv3's blocks take `between=`, called between their conv layers) when the
    model declares its `blocks` and runs them in order; other blocks stay whole units.
    """

    layerwise = False

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed=seed, **options)
        anatomy = self.anatomy
        if not anatomy.blocks:
            raise UsageError(f"sff needs a model with blocks; {type(model).__name__} has none (name them with "
                             "--blocks)")
        declared = getattr(model, "blocks", None)
        self.split = self.layerwise and isinstance(declared, nn.ModuleList) and any(
            getattr(b, "splittable", False) for b in declared
        )
        self.num_classes = anatomy.num_classes
        self.between = between_parameters(anatomy)
        param = next(model.parameters())
        if self.split:
            # A dry run (eval mode, no grad: BN statistics untouched) finds each split unit's channels.
            channels: list[int] = []
            with eval_mode(model), torch.no_grad():
                self._run(example_input(model, anatomy.input_shape), lambda k, h, ps: channels.append(h.shape[1]))
        else:
            channels = anatomy.block_widths()
        self.heads = self.parts.heads = nn.ModuleList(nn.Conv2d(c, self.num_classes, 1) for c in channels).to(
            param.device, param.dtype
        )
        for head in self.heads:  # seeded like every other random draw of an estimator
            init_uniform_(list(head.parameters()), head.in_channels, self.generator)

    def _norm(self, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, h.shape[1:]) if self.options["norm"] == "layer" else h

    def _run(self, x: torch.Tensor, visit: Visit) -> None:
        """Forward through all units; `visit(k, out, params)` sees unit k's raw output (graph attached) and the
        parameters its loss may reach."""
        if not self.split:
            blocks = self.anatomy.block_parameters()

            def at(i: int, out: torch.Tensor) -> torch.Tensor:
                visit(i, out, blocks[i] + self.between)
                return self._norm(out).detach()  # no gradient crosses this boundary

            with boundaries(self.anatomy, at):
                self.model(x)
            return
        index = 0
        h = x

        def end_unit(out: torch.Tensor) -> torch.Tensor:
            nonlocal index
            visit(index, out, list(block.parameters()))
            index += 1
            return self._norm(out).detach()  # no gradient crosses this boundary

        for block in self.model.blocks:  # noqa: B007 (end_unit reads the current block)
            if getattr(block, "splittable", False):
                out = block(h, between=end_unit)
            else:
                out = block(h)
            h = end_unit(out)

    def goodness(self, k: int, out: torch.Tensor) -> torch.Tensor:
        """[B, C]: mean over positions of the squared activations of head k's channel c."""
        if out.dim() == 2:
            out = out[:, :, None, None]
        elif out.dim() == 3:  # [B, T, C] tokens
            out = out.transpose(1, 2).unsqueeze(-1)
        return self.heads[k](out).pow(2).mean(dim=(2, 3))

    def combine(self, goodness: list[torch.Tensor]) -> torch.Tensor:
        if self.options["inference"] == "last":
            return goodness[-1]
        return torch.stack(goodness).mean(dim=0)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        goods: list[torch.Tensor] = []
        losses: list[torch.Tensor] = []
        params = self.trainable()
        for p in params:
            p.grad = None

        def visit(k: int, out: torch.Tensor, unit: list[nn.Parameter]) -> None:
            g = self.goodness(k, out)
            loss = F.cross_entropy(g, y)
            # Only this unit's block and head can be in the graph (the unit's input was detached); taking the
            # gradient now frees the unit's graph before the next unit runs.
            add_grads(loss, unit + list(self.heads[k].parameters()))
            goods.append(g.detach())
            losses.append(loss.detach())

        with torch.enable_grad():
            self._run(x, visit)
        zero_missing_grads(params)
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
        inside = [p for ps in self.anatomy.block_parameters() for p in ps] + self.between
        return [p for p in inside if p.requires_grad] + list(self.heads.parameters())


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
