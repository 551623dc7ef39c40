"""Checks of command-line inputs that several commands share (output folders, devices, seeds), made before any work."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bpfree.errors import UsageError


def output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create the folder `path` (and its parents) or raise one UsageError naming why it cannot be one.

    A file where the folder or one of its parents should be, a read-only parent, a name too long: each would
    otherwise surface only after the work, when the results are written."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "" if part == path else f" (its parent {part} is a file)"
                raise UsageError(f"{flag} {path} cannot be a folder{where or ': it is a file'}")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create the folder: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the folder is not writable")
    return path


def check_device(name: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N` as a torch.device, or a UsageError saying why this machine cannot use it."""
    if not (name == "cpu" or name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise UsageError(f"unknown device {name!r} (choose cpu, cuda or cuda:N)")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} requested but CUDA is not available on this machine")
        index = int(name[5:] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


MAX_SEED = 2**32 - 1  # numpy's legacy seeding (np.random.seed) takes only unsigned 32-bit seeds


def check_seed(seed: int, flag: str = "--seed") -> int:
    """`seed`, or a UsageError if numpy could not take it."""
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{flag} must be in 0..{MAX_SEED} (2**32 - 1), got {seed}")
    return seed


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def check_threads(threads: int) -> int:
    """--threads between 1 and the cores this machine gives the process (far more threads crashed torch's pool)."""
    cores = cpu_cores()
    if not 1 <= threads <= cores:
        raise UsageError(f"--threads must be in 1..{cores} (the CPU cores this process may use), got {threads}")
    return threads


def check_nproc(nproc: int, device: str) -> int:
    """--nproc between 1 and the devices it spreads over: one CPU core per rank on cpu, one GPU per rank on cuda.

    More ranks than cores only queue for the cores, each slower than one process would be."""
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    if device.startswith("cuda"):
        limit, what = (torch.cuda.device_count(), "CUDA devices") if torch.cuda.is_available() else (nproc, "")
    else:
        limit, what = cpu_cores(), "CPU cores this process may use"
    if nproc > limit:
        raise UsageError(f"--nproc {nproc}: more ranks than the {limit} {what}; each rank needs one of its own")
    return nproc


def parameters_without_gradient(model: torch.nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """Trainable parameters of modules that run in the model's forward yet get no gradient from its logits: used
    under torch.no_grad() (or with their result detached). Modules the forward never calls (a local rule's heads)
    are not counted.

    One probe pass with gradients (eval mode: batch-norm statistics untouched) and one backward from the logits.
    """
    from bpfree.anatomy import eval_mode, example_input

    ran: set[str] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, _o, n=n: ran.add(n)) for n, m in model.named_modules()]
    buffers = [(b, b.clone()) for b in model.buffers()]  # a module may count its calls: the probe leaves no trace
    try:
        with eval_mode(model), torch.enable_grad():
            out = model(example_input(model, input_shape))
            named = [(f"{m}.{n}" if m else n, p) for m, module in model.named_modules() if m in ran
                     for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not named or not out.requires_grad:
                return [n for n, _ in named]
            grads = torch.autograd.grad(out.float().sum(), [p for _, p in named], allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return [n for (n, _), g in zip(named, grads) if g is None]


def check_forward_mode_can_train(model: torch.nn.Module, method: str) -> None:
    """Forward-mode rules (fg-w, fg-a and their block-local forms) see a tangent through torch.no_grad(), so they
    would train parameters that the model's forward keeps out of every gradient, as backprop would not: refused."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        return  # the estimator says the input shape is unknown
    cut = parameters_without_gradient(model, tuple(shape))
    if cut:
        more = f" and {len(cut) - 1} more" if len(cut) > 1 else ""
        raise UsageError(f"{method}: the model's forward gives {cut[0]}{more} no gradient (torch.no_grad() inside "
                         "forward, or unused), which forward mode would train anyway; freeze such parameters with "
                         "requires_grad_(False) instead")
