"""Data-parallel plumbing on torch.distributed (gloo on CPU, NCCL on CUDA), launched by torchrun.

Each rank trains on its contiguous share of every global batch. After an estimator's `step`, the ranks combine
what they computed so that every rank applies the same update, the one a single process would apply to the whole
global batch. What is combined is the estimator's policy (`Estimator.all_reduce_gradients`): by default every
`p.grad`, averaged; forward-gradient estimators with seed-shared tangents average only their K directional
derivatives (O(K) bytes instead of O(parameters)).

Averages are weighted by each rank's number of examples, because a step's loss is a mean over the examples: with
shards of n_r examples the global mean gradient is sum_r n_r g_r / sum_r n_r (shards differ at the last batch).

`Group` is the one object the trainer and estimators talk to. On one process it is `LOCAL`, whose every operation
is a no-op, so single-process code paths pay nothing.
"""

from __future__ import annotations

import io
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from bpfree.errors import DistributedError, UsageError

BUCKET = 1 << 20  # elements (4 MB of float32): bigger gradients are all-reduced in place, smaller ones packed
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
MAX_TIMEOUT = 7 * 24 * 3600.0  # seconds; --dist-timeout beyond a week is surely a mistake (and inf overflows)
# `train --nproc N`: seconds the launcher gives the other ranks to end after one failed, before SIGKILL. Ranks end at
# once on SIGTERM (the command line leaves it at its default in workers); only a stopped or stuck rank needs the kill.
STOP_GRACE = 2


def check_timeout(seconds: float) -> None:
    """--dist-timeout must be a finite positive number of seconds (torch turns it into a timedelta)."""
    if not (0 < seconds <= MAX_TIMEOUT and math.isfinite(seconds)):
        raise UsageError(f"--dist-timeout must be a number of seconds in (0, {MAX_TIMEOUT:.0f}], got {seconds}")


class Shard(NamedTuple):
    """This rank's rows [start, stop) of a global batch of `total` examples; `weight`: how many of them it counts."""

    start: int
    stop: int
    total: int
    weight: int


def shard(total: int, rank: int, world_size: int) -> Shard:
    """The contiguous share of a global batch that rank `rank` trains on (the split torch.tensor_split makes).

    A batch with fewer examples than ranks (the last one of an epoch) leaves some ranks no share of their own: those
    step on the whole batch with weight 0, so that collectives inside a step still meet every rank while the update
    is exactly the one of the examples counted once (dropping the batch lost examples and broke equivalence).
    """
    size, extra = divmod(total, world_size)
    start = rank * size + min(rank, extra)
    stop = start + size + (rank < extra)
    if stop == start:
        return Shard(0, total, total, 0)
    return Shard(start, stop, total, stop - start)


class Group:
    """The ranks of one data-parallel run, with a count of the bytes each rank contributes to collectives.

    `bytes` counts payload bytes per rank (the size of each all-reduce buffer, the number that scales with the
    method: a ring all-reduce moves about 2 (N-1)/N times this over each rank's link).
    """

    def __init__(
        self, rank: int = 0, world_size: int = 1, local_rank: int = 0, timeout: float = 60.0, owner: bool = False
    ):
        self.owner = owner  # whether this object created the process group (and so destroys it)
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.timeout = timeout
        self.bytes = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes config, metrics and checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # -- collectives (no-ops on one process) -----------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        """Run one collective; a peer that died or timed out becomes one clear DistributedError."""
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistError) as e:  # gloo/NCCL report a dead peer or a timeout as these
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"{what} failed: another of the {self.world_size} ranks died or did not answer within "
                f"--dist-timeout {self.timeout:g} s ({first[:200]})"
            ) from None

    def weighted_mean_(self, tensors: Sequence[torch.Tensor], weight: float) -> None:
        """In place: each tensor becomes sum_r weight_r * t_r / sum_r weight_r over the ranks.

        Tensors of at least BUCKET elements are all-reduced in place (no copy); the small ones are packed into one
        buffer together with the weight. All collectives are in flight at once. On the 1.9 M-parameter MLP this
        beat one flattened all-reduce (whose two copies cost more than the saved latency) and one all-reduce per
        tensor; numbers and command in docs/distributed.md.
        """
        if not self.active or not tensors:
            return
        big = [t for t in tensors if t.numel() >= BUCKET and t.is_contiguous()]
        small = [t for t in tensors if not (t.numel() >= BUCKET and t.is_contiguous())]
        ref = tensors[0]
        packed = torch.cat([t.detach().reshape(-1).to(ref.dtype) for t in small] + [ref.new_full((1,), weight)])
        packed[:-1].mul_(weight)
        for t in big:
            t.mul_(weight)
        buffers = [*big, packed]
        self.bytes += sum(t.numel() * t.element_size() for t in buffers)
        works = [self._call("all_reduce", dist.all_reduce, t, async_op=True) for t in buffers]
        for work in works:
            self._call("all_reduce", work.wait)
        total = packed[-1]
        for t in big:
            t.div_(total)
        packed[:-1].div_(total)
        offset = 0
        for t in small:
            n = t.numel()
            t.copy_(packed[offset : offset + n].view_as(t))
            offset += n

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (metrics: loss sums, error counts); a new tensor on the input's device. Not counted in
        `bytes`: it runs once per epoch, not per step."""
        if not self.active:
            return values
        out = values.detach().to(self.device_for_collectives(), copy=True)  # NCCL reduces CUDA tensors only
        self._call("all_reduce", dist.all_reduce, out)
        return out.to(values.device)

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's `data` on every rank (checkpoints: ranks need not share a file system)."""
        if not self.active:
            return data or b""
        device = self.device_for_collectives()
        size = torch.tensor([len(data) if self.is_main and data is not None else 0], dtype=torch.int64,
                            device=device)
        self._call("broadcast", dist.broadcast, size, 0)
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        if self.is_main and data:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        if buf.numel():
            self._call("broadcast", dist.broadcast, buf, 0)
        return bytes(buf.cpu().numpy())

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's `data`, in rank order, on every rank (per-rank RNG states for the checkpoint)."""
        if not self.active:
            return [data]
        device = self.device_for_collectives()
        size = torch.tensor([len(data)], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        self._call("all_gather", dist.all_gather, sizes, size)
        longest = int(max(s.item() for s in sizes))
        buf = torch.zeros(longest, dtype=torch.uint8, device=device)
        if data:
            buf[: len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        bufs = [torch.empty_like(buf) for _ in range(self.world_size)]
        self._call("all_gather", dist.all_gather, bufs, buf)
        return [bytes(b[: int(n.item())].cpu().numpy()) for b, n in zip(bufs, sizes)]

    def broadcast_error(self, error: Exception | None) -> None:
        """Rank 0 found bad input (e.g. an existing run): every rank raises the same UsageError, no rank hangs."""
        message = self.broadcast_bytes(str(error).encode() if error is not None else b"").decode()
        if error is not None:
            raise error
        if message:
            raise UsageError(message)

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers everywhere (ranks start identical even if seeding differed)."""
        if not self.active:
            return
        for t in [*module.parameters(), *module.buffers()]:
            self._call("broadcast", dist.broadcast, t.data, 0)

    def device_for_collectives(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


LOCAL = Group()


def reduce_state(group: Group, state: Sequence[torch.Tensor], model: nn.Module, weight: float) -> None:
    """After a data-parallel step: the estimator's learned state and the model's float buffers (BatchNorm running
    statistics) averaged over the ranks, weighted by examples, so that every rank (and rank 0's checkpoint) holds
    the same model and estimator."""
    tensors = [*state, *(b for b in model.buffers() if b.is_floating_point())]
    if tensors:
        group.weighted_mean_(tensors, weight)


def gather_rng_states(
    group: Group, rng_state: Callable[[], dict[str, Any]], generator: torch.Generator
) -> list[dict[str, Any]] | None:
    """Data-parallel: every rank's random-number states (torch's, numpy's, Python's, the estimator's generator), on
    rank 0, for the checkpoint: a resumed rank continues its own streams (dropout masks, ff's negatives), not rank
    0's. None on one process (the checkpoint's own states are the only ones)."""
    if not group.active:
        return None
    buf = io.BytesIO()
    torch.save({"rng": rng_state(), "generator": generator.get_state()}, buf)
    blobs = group.all_gather_bytes(buf.getvalue())
    if not group.is_main:
        return None
    return [torch.load(io.BytesIO(b), weights_only=True) for b in blobs]


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str, timeout: float) -> tuple[Group, str]:
    """The group torchrun's environment describes (LOCAL when not launched by it), and this rank's device.

    CUDA runs put rank r on GPU LOCAL_RANK and use NCCL; CPU runs use gloo. Returns (group, device string).
    """
    if not launched_by_torchrun():
        return LOCAL, device
    check_timeout(timeout)
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set: launch with torchrun or --nproc")
    rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    owner = not dist.is_initialized()  # a caller may have set up the group itself (and keeps it)
    if owner:
        try:
            dist.init_process_group(
                "nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout),
                device_id=torch.device(device) if cuda else None, store=_attempt_store(rank, world, timeout),
            )
        except (RuntimeError, dist.DistError) as e:
            raise DistributedError(f"rank {rank}: could not join the process group: {str(e).splitlines()[0]}") from None
    return Group(rank, world, local, timeout, owner), device


def _attempt_store(rank: int, world: int, timeout: float) -> dist.Store | None:
    """After torchrun restarted the workers (--max-restarts), a store with a fresh key prefix; else None (env://).

    The elastic agent's store outlives the workers, and the previous attempt's rank addresses left in it make the
    new ranks dial dead processes ("Connection refused"). A per-attempt prefix gives each attempt clean keys.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0:
        return None
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts it, as env:// does
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=not agent_hosts and rank == 0, timeout=timedelta(seconds=timeout))
    return dist.PrefixStore(f"bpfree/attempt{attempt}", base)


def shutdown(group: Group) -> None:
    """Tear the group down together: a rank that destroys its gloo context while a peer is still writing files can
    abort that peer ("terminate called without an active exception"), so all ranks meet at a barrier first."""
    if group.owner and dist.is_initialized():
        try:
            dist.barrier()
        except (RuntimeError, dist.DistError):
            pass  # a peer is already gone; destroying our side is all that is left
        dist.destroy_process_group()


# -- `bpfree train --nproc N`: the same as `torchrun --standalone --nproc-per-node N -m bpfree train ...` -----------
def strip_nproc(argv: Sequence[str]) -> list[str]:
    """The command line without --nproc N / --nproc=N (what every worker runs)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch(nproc: int, argv: Sequence[str], title: str = "data-parallel run") -> int:
    """Run `python -m bpfree ARGV` on `nproc` local processes through torch.distributed.run (torchrun).

    Returns 0, or the exit code of the first rank that failed with an error of its own (2 bad input, 3 diverged);
    else 4: a rank was killed by a signal or lost a peer. The elastic agent stops the other ranks as soon as one
    fails (SIGKILL after STOP_GRACE seconds). Ctrl-C / SIGTERM on the launcher stop every rank: 130 / 143. One line
    on stderr says what happened (the agent's own log lines are silenced); `title` names the run there.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import config_from_args, get_args_parser

    run_args = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0", "--monitor-interval", "0.1",
         "-m", "bpfree", *argv]
    )
    run_args.rdzv_backend, run_args.rdzv_endpoint = "c10d", "localhost:0"  # what --standalone means: a free port
    run_args.rdzv_id = f"bpfree-{os.getpid()}"
    # torchrun's own default for several processes per machine, set here so that it does not print its banner.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config, cmd, cmd_args = config_from_args(run_args)
    config.shutdown_timeout = STOP_GRACE
    from torch.distributed.launcher.api import elastic_launch

    # The agent's log lines repeat what the one line below says; each elastic module's logger sets its own level.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        with _agent_fixes(STOP_GRACE):
            elastic_launch(config, cmd)(*cmd_args)
    except ChildFailedError as e:
        # Every rank that failed, first first (insertion order breaks ties: timestamps are whole seconds). A rank
        # that exits 4 lost a peer, so the root cause is elsewhere; ranks the agent stopped may be listed too.
        failures = sorted(e.failures.items(), key=lambda kv: kv[1].timestamp)
        what = ", ".join(f"rank {rank} was killed by signal {-f.exitcode} ({_signal_name(-f.exitcode)})"
                         if f.exitcode < 0 else f"rank {rank} exited with code {f.exitcode}" for rank, f in failures)
        code = next((f.exitcode for _, f in failures if f.exitcode > 0 and f.exitcode != DistributedError.exit_code),
                    DistributedError.exit_code)
        kind = "distributed: " if code == DistributedError.exit_code else ""
        print(f"bpfree: {kind}the {title} failed: {what}", file=sys.stderr)
        return code
    except SignalException as e:  # the launcher itself got SIGINT / SIGTERM; the agent stopped the ranks
        terminated = e.sigval == signal.SIGTERM
        print(f"bpfree: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    return 0


@contextmanager
def _agent_fixes(seconds: int) -> Iterator[None]:
    """For one launch: the elastic agent SIGKILLs the remaining ranks `seconds` after SIGTERM when one rank failed,
    and leaves the caller's signal handlers as they were.

    torch's SubprocessContext stops the other workers after a failure through `close()` with its fixed 30 s default
    (the launch config's shutdown_timeout reaches only the agent's final clean-up), so a stopped or stuck rank held
    the launcher 30 s past --dist-timeout.
    """
    from torch.distributed.elastic.multiprocessing.api import SubprocessContext

    original = SubprocessContext.__dict__.get("_close")
    # The agent also installs signal handlers of its own and leaves them: put back the caller's afterwards.
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}

    def close(self, death_sig: signal.Signals, timeout: int = 30) -> None:
        original(self, death_sig, min(timeout, seconds))

    if original is not None:
        SubprocessContext._close = close
    try:
        yield
    finally:
        if original is not None:
            SubprocessContext._close = original
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"
