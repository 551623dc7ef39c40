"""A model's anatomy: its parametrised layers and its blocks, derived from any `nn.Module`.

Every learning rule reads the same description of a network:

- **layers**: the parametrised linear maps (`nn.Linear`, `nn.Conv1d/2d`, `nn.MultiheadAttention`), where feedback
  alignment swaps the backward, weight perturbation perturbs weights and activity perturbation perturbs outputs;
- **blocks**: an ordered list of segments whose outputs are the local-learning boundaries, where DFA/FDFA inject
  feedback, local and goodness heads attach, Forward-Forward measures goodness and stop-gradients go. Everything
  after the last block (the readout, or "head") maps the last block's output to the logits.

Blocks, in order of preference: the names the caller gives; the model's declared `blocks` (an `nn.ModuleList`:
resnet18, mobilenetv3-*, localmixer-*); the children of an `nn.Sequential`, grouped so that each block holds one
parametrised layer and the parameter-free modules after it (Flatten before the first layer joins the first
block), the group with the last layer being the readout; otherwise the submodules in the order `forward` calls
them (found with a hooked probe pass) and grouped the same way, a called `nn.Sequential` / `nn.ModuleList` of
layers — or a module holding one, like `nn.TransformerEncoder` — opened one level.

A block's boundary is the output of its `exit` module; `boundaries` hooks it so a rule can see (and replace, e.g.
detach) every block output in one ordinary forward pass of the model, whatever its `forward` does between blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from bpfree.core.errors import UsageError

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)


def has_layer(module: nn.Module) -> bool:
    return any(isinstance(m, LAYER_TYPES) for m in module.modules())


@dataclass
class Block:
    """One local-learning segment: `modules` run in order (within the model's own forward); `exit` ends it."""

    name: str
    modules: list[nn.Module]

    @property
    def exit(self) -> nn.Module:
        return self.modules[-1]

    def parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for m in self.modules:
            for p in m.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())


@dataclass
class Anatomy:
    """What the rules read. `block_shapes[i]` is block i's per-example output shape (from one probe pass)."""

    model: nn.Module
    input_shape: tuple[int, ...]
    layers: list[tuple[str, nn.Module]]
    blocks: list[Block]
    block_shapes: list[tuple[int, ...]] = field(default_factory=list)
    num_classes: int = 0

    def block_parameters(self) -> list[list[nn.Parameter]]:
        return [b.parameters() for b in self.blocks]

    def readout_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters in no block: those after the last block and any the model's forward uses between
        blocks (positional embeddings, a class token); each gets its gradient from the next boundary downstream."""
        inside = {id(p) for b in self.blocks for p in b.parameters()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in inside]

    def block_widths(self) -> list[int]:
        """The channels of every block output (see `channels`)."""
        return [channels(s) for s in self.block_shapes]


def channels(shape: Sequence[int]) -> int:
    """Channels of a per-example shape: [C] -> C, [C, H, W] -> C; a 2-D shape is read as [T, C] (tokens)."""
    if len(shape) == 1:
        return int(shape[0])
    if len(shape) == 2:
        return int(shape[1])  # [T, C]: transformer tokens
    return int(shape[0])


def pool(h: torch.Tensor) -> torch.Tensor:
    """[B, C] as is; [B, C, H, W] (or [B, C, L]) averaged over positions; [B, T, C] averaged over tokens."""
    if h.dim() == 2:
        return h
    if h.dim() == 3:
        return h.mean(1)
    return h.flatten(2).mean(-1)


def pooled_positions(h: torch.Tensor) -> int:
    """How many positions (or tokens) `pool` averages over (1: none)."""
    if h.dim() == 2:
        return 1
    if h.dim() == 3:
        return h.shape[1]
    return math.prod(h.shape[2:])


def positions_last(h: torch.Tensor) -> torch.Tensor:
    """A block output as [B, positions, C]: spatial positions or tokens are the patches of local losses."""
    if h.dim() == 3:
        return h
    if h.dim() >= 4:
        return h.flatten(2).transpose(1, 2)
    raise UsageError(f"a block output shaped {tuple(h.shape)} has no positions (patch-wise losses need [B, C, H, W] "
                     "or [B, T, C])")


# -- finding blocks --------------------------------------------------------------------------------------------


def _group(named: Iterable[tuple[str, nn.Module]]) -> list[Block]:
    """Each segment is one layer-holding module plus the layer-free modules after it; layer-free modules before
    the first layer (a Flatten) join the first segment."""
    segments: list[Block] = []
    leading: list[nn.Module] = []
    for name, module in named:
        if has_layer(module):
            segments.append(Block(name, [*leading, module]))
            leading = []
        elif segments:
            segments[-1].modules.append(module)
        else:
            leading.append(module)
    return segments


def _call_order(model: nn.Module, candidates: list[tuple[str, nn.Module]], x: torch.Tensor) -> list[str]:
    order: list[str] = []
    handles = []
    for name, module in candidates:
        def record(_m, _i, _o, name=name):
            if name in order:
                raise UsageError(f"submodule {name!r} runs more than once per forward pass; name the blocks with "
                                 "--blocks")
            order.append(name)
        handles.append(module.register_forward_hook(record))
    try:
        _probe(model, x)
    finally:
        for h in handles:
            h.remove()
    return order


def _expand(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Open a container of repeated layers one level (Sequential, ModuleList, or a module holding one)."""
    if isinstance(module, (nn.Sequential, nn.ModuleList)) and sum(has_layer(c) for c in module.children()) >= 2:
        return [(f"{name}.{n}", c) for n, c in module.named_children()]
    lists = [(n, c) for n, c in module.named_children() if isinstance(c, nn.ModuleList)]
    if len(lists) == 1 and sum(has_layer(c) for c in lists[0][1].children()) >= 2:
        inner_name, inner = lists[0]
        rest = [c for n, c in module.named_children() if n != inner_name]
        if not any(has_layer(c) for c in rest):  # e.g. TransformerEncoder: layers + an optional final norm
            return [(f"{name}.{inner_name}.{n}", c) for n, c in inner.named_children()]
    return [(name, module)]


def _generic_segments(model: nn.Module, x: torch.Tensor) -> list[Block]:
    candidates = [item for n, c in model.named_children() for item in _expand(n, c)]
    by_name = dict(candidates)
    return _group((name, by_name[name]) for name in _call_order(model, candidates, x))


def _named_blocks(model: nn.Module, names: Sequence[str]) -> list[Block]:
    modules = dict(model.named_modules())
    blocks = []
    for name in names:
        if name not in modules:
            close = [n for n in modules if n and n.endswith(name.split(".")[-1])][:3]
            hint = f"; submodules with that ending: {', '.join(close)}" if close else ""
            raise UsageError(f"--blocks: the model has no submodule {name!r}{hint}")
        blocks.append(Block(name, [modules[name]]))
    return blocks


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for a while (probe passes leave batch-norm statistics untouched), then as it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _probe(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One forward pass in eval mode without gradients."""
    with eval_mode(model), torch.no_grad():
        return model(x)


def example_input(model: nn.Module, input_shape: Sequence[int], batch: int = 2) -> torch.Tensor:
    p = next(model.parameters())
    return torch.zeros(batch, *input_shape, device=p.device, dtype=p.dtype)


def _first_linear_input(model: nn.Module) -> tuple[int, ...] | None:
    """An nn.Sequential starting (after any Flatten) with a Linear takes flat vectors of its in_features."""
    if not isinstance(model, nn.Sequential):
        return None
    for child in model:
        if isinstance(child, nn.Linear):
            return (child.in_features,)
        if not isinstance(child, nn.Flatten):
            return None
    return None


def describe(
    model: nn.Module, input_shape: Sequence[int] | None = None, blocks: Sequence[str] | None = None
) -> Anatomy:
    """The anatomy of `model` for inputs of per-example shape `input_shape` (default: `model.input_shape`)."""
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        shape = _first_linear_input(model)
    if shape is None:
        raise UsageError(f"{type(model).__name__}: the input shape is unknown; pass input_shape=(C, H, W) or set "
                         "the model's `input_shape` attribute")
    shape = tuple(int(s) for s in shape)
    x = example_input(model, shape)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    if blocks:
        found = _named_blocks(model, blocks)
    elif isinstance(getattr(model, "blocks", None), nn.ModuleList):
        found = [Block(f"blocks.{i}", [b]) for i, b in enumerate(model.blocks)]
    elif isinstance(model, nn.Sequential):
        found = _group(model.named_children())[:-1]  # the segment with the last layer is the readout
    else:
        found = _generic_segments(model, x)[:-1]
    anatomy = Anatomy(model, shape, layers, found)
    shapes: dict[int, list[tuple[int, ...]]] = {}

    def record(i: int, out: torch.Tensor) -> torch.Tensor:
        shapes.setdefault(i, []).append(tuple(out.shape[1:]))
        return out

    with boundaries(anatomy, record):
        logits = _probe(model, x)
    for i, block in enumerate(found):
        calls = len(shapes.get(i, []))
        if calls != 1:
            raise UsageError(f"block {block.name!r} ends {calls} times per forward pass (a block must end exactly "
                             "once; name the blocks with --blocks)")
    anatomy.block_shapes = [shapes[i][0] for i in range(len(found))]
    anatomy.num_classes = int(logits.shape[-1])
    return anatomy


def check_block_names(model: nn.Module, names: Sequence[str], input_shape: Sequence[int] | None = None) -> None:
    """`--blocks` for any rule: each name a submodule, given once, in the order the forward pass runs them, none
    inside another, and none holding the readout (the last layer to run, which produces the logits).

    One probe pass (eval mode, no gradients) records the call order. Checked once when an estimator is built, so
    every rule refuses the same names with the same line instead of failing later in its own way.
    """
    repeated = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if repeated is not None:
        raise UsageError(f"--blocks names {repeated!r} twice; name each block once")
    blocks = _named_blocks(model, names)
    for outer in names:
        inner = next((n for n in names if n.startswith(outer + ".")), None)
        if inner is not None:
            raise UsageError(f"--blocks: {inner!r} lies inside {outer!r}; name blocks that follow one another")
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None) or \
        _first_linear_input(model)
    if shape is None:
        return  # describe() says the input shape is unknown
    ran: list[str] = []
    layers: list[str] = []
    hooks = [b.modules[0].register_forward_hook(lambda _m, _i, _o, n=b.name: ran.append(n)) for b in blocks]
    hooks += [m.register_forward_hook(lambda _m, _i, _o, n=n: layers.append(n))
              for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    try:
        _probe(model, example_input(model, tuple(int(s) for s in shape)))
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in ran]
    if missing:
        raise UsageError(f"--blocks: {missing[0]!r} does not run in the model's forward pass")
    order = list(dict.fromkeys(ran))
    if order != list(names):
        raise UsageError(f"--blocks {','.join(names)}: not the order the forward pass runs them; give "
                         f"--blocks {','.join(order)}")
    readout = layers[-1] if layers else None
    holder = next((n for n in names if readout is not None and (readout == n or readout.startswith(n + "."))), None)
    if holder is not None:
        raise UsageError(f"--blocks: {holder!r} holds the readout {readout!r} (the last layer, which produces the "
                         "logits); blocks end before it")


# -- using blocks ----------------------------------------------------------------------------------------------

BoundaryFn = Callable[[int, torch.Tensor], torch.Tensor]


@contextmanager
def boundaries(anatomy: Anatomy, at_output: BoundaryFn) -> Iterator[None]:
    """While active, block i's output `out` is replaced by `at_output(i, out)` (return `out` to only look)."""
    handles = []
    for i, block in enumerate(anatomy.blocks):
        def hook(_m, _inputs, out, i=i):
            if not isinstance(out, torch.Tensor):
                raise UsageError(f"block {anatomy.blocks[i].name!r} returns {type(out).__name__}, not a tensor")
            return at_output(i, out)
        handles.append(block.exit.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def forwards_replaced(replacements: Sequence[tuple[nn.Module, Callable[..., object]]]) -> Iterator[None]:
    """While active, each module's `forward` is the given function (its hooks still run); restored after, also a
    forward the module had set on itself."""
    saved = [(m, vars(m).get("forward")) for m, _ in replacements]
    for m, fn in replacements:
        m.forward = fn
    try:
        yield
    finally:
        for m, old in reversed(saved):
            if old is None:
                del m.forward
            else:
                m.forward = old


def uniform_like(t: torch.Tensor, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """A new tensor shaped like t drawn from U(±1/sqrt(fan_in)): the scale of PyTorch's default Linear/Conv init
    (estimator-owned heads, and every feedback-alignment B)."""
    u = torch.rand(t.shape, generator=generator, device=t.device, dtype=t.dtype)
    return (2 * u - 1) * fan_in**-0.5


def init_uniform_(params: Sequence[torch.Tensor], fan_in: int, generator: torch.Generator) -> None:
    """PyTorch's default Linear/Conv init, U(±1/sqrt(fan_in)), drawn from an estimator's generator."""
    with torch.no_grad():
        for p in params:
            p.copy_(uniform_like(p, fan_in, generator))


def parameter_use(model: torch.nn.Module, input_shape: tuple[int, ...]) -> tuple[set[str], dict[str, bool]]:
    """One probe pass with gradients (eval mode; buffers put back): the names of the modules whose forward ran, and
    for every trainable parameter (by module name and parameter name) whether the logits reach it."""
    ran: set[str] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, _o, n=n: ran.add(n)) for n, m in model.named_modules()]
    buffers = [(b, b.clone()) for b in model.buffers()]  # a module may count its calls: the probe leaves no trace
    named = [(f"{m}.{n}" if m else n, p) for m, module in model.named_modules()
             for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    try:
        with eval_mode(model), torch.enable_grad():
            out = model(example_input(model, input_shape))
            grads = torch.autograd.grad(out.float().sum(), [p for _, p in named], allow_unused=True) \
                if named and out.requires_grad else [None] * len(named)
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return ran, {n: g is not None for (n, _), g in zip(named, grads)}


def check_parameter_reach(model: torch.nn.Module, method: str, *, forward_mode: bool, layer_calls: bool) -> None:
    """What a rule needs of the model's forward, from one probe pass (`parameter_use`); refused with one line:

    - `forward_mode` (fg-w, fg-a and their block-local forms): a tangent passes torch.no_grad(), so these rules would
      train parameters of modules that run yet get no gradient from the logits (used under torch.no_grad(), or
      detached), as backprop would not. Modules the forward never calls (a local rule's heads) do not count.
    - `layer_calls` (rules that act on a layer by replacing its forward: feedback alignment's B, activity tangents):
      a layer (Linear, Conv, attention) whose forward never runs yet whose parameters the logits reach is used
      through its weight (`F.linear(x, layer.weight)`); the rule would not reach it. An attention's projections run
      inside its own forward, which the rules patch.
    """
    shape = getattr(model, "input_shape", None)
    if shape is None or not (forward_mode or layer_calls):
        return  # without an input shape the estimator says so itself
    ran, reached = parameter_use(model, tuple(shape))
    cut = [n for n, ok in reached.items() if not ok and n.rpartition(".")[0] in ran]
    if forward_mode and cut:
        more = f" and {len(cut) - 1} more" if len(cut) > 1 else ""
        raise UsageError(f"{method}: the model's forward gives {cut[0]}{more} no gradient (torch.no_grad() inside "
                         "forward, or unused), which forward mode would train anyway; freeze such parameters with "
                         "requires_grad_(False) instead")
    inside = {f"{name}.{child}" for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
              for child, _ in m.named_modules() if child}
    used = [name for name, m in model.named_modules() if isinstance(m, LAYER_TYPES) and name not in ran
            and name not in inside and any(reached.get(f"{name}.{n}") for n, _ in m.named_parameters(recurse=False))]
    if layer_calls and used:
        more = f" and {len(used) - 1} more" if len(used) > 1 else ""
        raise UsageError(f"{method}: the model uses the weight of layer {used[0]!r}{more} directly (e.g. "
                         "F.linear(x, layer.weight)) instead of calling the layer, which this rule reaches only "
                         "through its forward; call the layer as a module, or choose bp, dfa, fg-w, l-bp or sff")
