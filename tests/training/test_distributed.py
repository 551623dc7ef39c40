"""Data-parallel training on 2 local gloo ranks: same result as one process on the whole batch, rank-0-only files,
bytes per step per method, a dead rank stops the others, and --resume (through `bpfree train --nproc 2`) continues.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bpfree import methods, models
from bpfree.cli import main
from bpfree.core.group import LOCAL, Group, Shard
from bpfree.training.distributed import strip_nproc
from bpfree.training.runfolder import read_metrics
from bpfree.training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
HIDDEN = (16,)
# 200 examples in batches of 63: shards of 32 and 31 examples, and a last batch of 11 (6 + 5), so the
# weighting of the ranks' averages by their shard sizes is exercised.
BASE = dict(model="mlp", data="mnist", epochs=1, batch_size=63, train_size=200, seed=5, optimizer="adam",
            lr=1e-2, model_options={"hidden": HIDDEN})
RUNS = {
    "bp": dict(method="bp"),
    "fg-w": dict(method="fg-w", method_options={"tangents": 3, "aggregation": "orthogonal"}),
    "fg-w-noreadout": dict(method="fg-w", method_options={"tangents": 2, "exact_readout": False}),
    "fg-a": dict(method="fg-a", method_options={"tangents": 2}),
    "lg-fg-w": dict(method="lg-fg-w", model="localmixer-m1-16", model_options={"channels": 16, "groups": 4},
                    method_options={"tangents": 2}),
    "lg-fg-a": dict(method="lg-fg-a", model="localmixer-m1-16", model_options={"channels": 16, "groups": 4}),
    # A last batch of 1 example: rank 1 has no share of its own, steps on the whole batch with weight 0.
    "bp-tail": dict(method="bp", train_size=201, batch_size=100),
    "fa": dict(method="fa"),
    "dfa": dict(method="dfa"),
    # fdfa's learned feedback: B learns from the global batch's estimate; tangents drawn for the whole batch.
    "fdfa": dict(method="fdfa", train_size=201, batch_size=100),
    "fdfa-generic-adam": dict(method="fdfa", model="localmixer-m1-16", model_options={"channels": 16, "groups": 4},
                              method_options={"feedback_optimizer": "adam", "feedback_timing": "after"}),
    # Recomputing (two passes, block at a time): the same global-batch tangents and B updates.
    "fdfa-recompute": dict(method="fdfa", train_size=201, batch_size=100, method_options={"recompute": True}),
    "dfa-recompute": dict(method="dfa", method_options={"recompute": True}),
    "fdfa-generic": dict(method="fdfa", model="cnn-small", model_options={}, train_size=101, batch_size=50),
    # Per-example tangents drawn for the whole global batch, each rank keeping its rows: as one process.
    "fg-a-generic": dict(method="fg-a", model="cnn-small", model_options={}, train_size=101, batch_size=50),
    "fg-a-recompute": dict(method="fg-a", method_options={"tangents": 2, "recompute": True}),
    "lg-fg-a-generic": dict(method="lg-fg-a", model_options={"hidden": (16, 16)},
                            method_options={"tangents": 2}),
    "l-bp": dict(method="l-bp", model_options={"hidden": (16, 16)}),
    "l-fa": dict(method="l-fa", model_options={"hidden": (16, 16)}),
    "lg-bp": dict(method="lg-bp", model="localmixer-m1-16", model_options={"channels": 16, "groups": 4}),
    "lg-fa": dict(method="lg-fa", model="localmixer-m1-16", model_options={"channels": 16, "groups": 4}),
    "sff": dict(method="sff", model_options={"hidden": (16, 16)}),
    "sff-block": dict(method="sff-block", model_options={"hidden": (16, 16)}),
    # ff draws each example's negative label (and ff-mlp's dropout masks) from its rank's stream: not the one
    # process's numbers, so only the reduced state (peer normalisation's running means) and resume are checked.
    "ff": dict(method="ff", model="ff-mlp", model_options={"hidden": (16, 16)},
               method_options={"peer_norm": 0.03, "negatives": "random", "input_dropout": 0.1}),
    "ff-generic": dict(method="ff", model_options={"hidden": (16, 16)}),
    # Resumed after epoch 1 on 2 ranks (`resume_to`): must equal the uninterrupted 2-epoch runs below.
    "fdfa-resumed": dict(method="fdfa", train_size=201, batch_size=100, resume_to=2),
    "fdfa-whole": dict(method="fdfa", train_size=201, batch_size=100, epochs=2),
    "ff-resumed": dict(method="ff", model="ff-mlp", model_options={"hidden": (16, 16)}, resume_to=2,
                       method_options={"peer_norm": 0.03, "negatives": "random", "input_dropout": 0.1}),
    "ff-whole": dict(method="ff", model="ff-mlp", model_options={"hidden": (16, 16)}, epochs=2,
                     method_options={"peer_norm": 0.03, "negatives": "random", "input_dropout": 0.1}),
}
# Rules whose every random number is either shared by the ranks or drawn per example for the whole global batch:
# their 2-rank runs equal one process on the whole batch. ff draws its negatives per rank, and LocalMixer's lg-fg-a
# path its tangents: the same estimators, other random numbers.
EXACT = ["bp", "bp-tail", "fa", "dfa", "fdfa", "fdfa-generic-adam", "fdfa-recompute", "dfa-recompute",
         "fdfa-generic", "fg-a", "fg-a-generic", "fg-a-recompute", "lg-fg-a-generic", "fg-w",
         "fg-w-noreadout", "l-bp", "l-fa", "lg-bp", "lg-fa", "lg-fg-w", "sff", "sff-block"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def start_ranks(cmd: list[str], world: int = 2, **popen) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen(cmd, env=rank_env(r, world, port), **popen) for r in range(world)]


def config(name: str, out: Path, root: Path) -> dict:
    return {**BASE, **RUNS[name], "out": str(out / name), "data_root": str(root)}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, data_root):
    """All RUNS trained once on 2 ranks (one process group, one start-up)."""
    out = tmp_path_factory.mktemp("dist")
    procs = start_ranks([sys.executable, str(WORKER), json.dumps([config(n, out, data_root) for n in RUNS])],
                        stderr=subprocess.PIPE, text=True)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    return out


@pytest.mark.parametrize("name", EXACT)
def test_two_ranks_equal_one_process_on_the_whole_batch(two_rank_runs, data_root, tmp_path, name):
    single = config(name, tmp_path, data_root)
    single.pop("resume_to", None)
    train(TrainConfig(**single), show_progress=False)
    one = torch.load(Path(single["out"]) / "checkpoint.pt", weights_only=True)["model"]
    two = torch.load(two_rank_runs / name / "checkpoint.pt", weights_only=True)["model"]
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    a = read_metrics(Path(single["out"]) / "metrics.jsonl")[0]
    b = read_metrics(two_rank_runs / name / "metrics.jsonl")[0]
    for key in ("train_loss", "train_error", "test_error", "test_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("name", [n for n in RUNS if "resumed" not in n])
def test_ranks_hold_identical_parameters_and_only_rank0_writes(two_rank_runs, name):
    folder = two_rank_runs / name
    r0, r1 = (torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    written = sorted(p.name for p in folder.iterdir() if not p.name.startswith("rank"))
    assert written == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    assert json.loads((folder / "config.json").read_text())["world_size"] == 2


def test_last_batch_smaller_than_world_is_trained_not_dropped(two_rank_runs):
    record = read_metrics(two_rank_runs / "bp-tail" / "metrics.jsonl")[0]
    assert record["train_loss"] == record["train_loss"]  # finite, not NaN
    # 3 steps (100, 100, 1 examples), all counted: the step of 1 example is not dropped.
    assert record["comm_bytes_per_step"] == pytest.approx(4 * (models.count_parameters(
        models.build("mlp", 10, (1, 8, 8), hidden=HIDDEN)) + 1))
    assert torch.load(two_rank_runs / "bp-tail" / "checkpoint.pt", weights_only=True)["schedule"]["last_epoch"] == 3


@pytest.mark.parametrize("name", ["fdfa", "ff"])
def test_learned_estimator_state_is_the_same_on_every_rank(two_rank_runs, name):
    r0, r1 = (torch.load(two_rank_runs / name / f"rank{r}.state.pt", weights_only=True) for r in (0, 1))
    assert r0 and len(r0) == len(r1)
    for a, b in zip(r0, r1):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["fdfa", "ff"])
def test_resume_on_two_ranks_equals_the_uninterrupted_run(two_rank_runs, name):
    resumed = read_metrics(two_rank_runs / f"{name}-resumed" / "metrics.jsonl")
    whole = read_metrics(two_rank_runs / f"{name}-whole" / "metrics.jsonl")
    assert [r["epoch"] for r in resumed] == [1, 2]
    for a, b in zip(whole, resumed):
        for key in ("train_loss", "test_loss", "train_error"):
            assert b[key] == a[key], (a["epoch"], key)


def test_bad_input_found_by_rank0_stops_every_rank(two_rank_runs):
    folder = two_rank_runs / "bp"  # the worker restarted this run without --resume
    errors = [(folder / f"rank{r}.error").read_text() for r in (0, 1)]
    assert errors[0] == errors[1] and "already holds a run" in errors[0]


def test_weighted_mean_over_ranks(two_rank_runs):
    for r in (0, 1):  # rank 0 weighs 3 (say 3 examples), rank 1 weighs 1; a big, a small and a half-big tensor
        assert json.loads((two_rank_runs / "bp" / f"rank{r}.mean").read_text()) == [[1.25], [12.5], [-1.0]]


def test_bytes_per_step_per_method(two_rank_runs):
    params = models.count_parameters(models.build("mlp", 10, (1, 8, 8), hidden=HIDDEN))
    readout = HIDDEN[-1] * 10 + 10
    per_step = {n: read_metrics(two_rank_runs / n / "metrics.jsonl")[0]["comm_bytes_per_step"] for n in RUNS
                if "resumed" not in n}
    # Every all-reduce carries its float32 payload plus the rank's weight (its share of the batch).
    assert per_step["bp"] == 4 * (params + 1)
    assert per_step["fg-a"] == 4 * (params + 1)  # per-example tangents: the full gradient must be summed
    assert per_step["fg-w"] == 4 * (3 + 1) + 4 * (readout + 1)  # K numbers + the exact readout's gradient
    assert per_step["fg-w-noreadout"] == 4 * (2 + 1)  # K numbers only
    # lg-fg-w: K x P x G numbers for the block (K=2, one patch, 4 groups), then the exact head + readout gradients.
    mixer = models.build("localmixer-m1-16", 10, (1, 8, 8), channels=16, groups=4)
    exact = sum(p.numel() for p in [*mixer.heads.parameters(), *mixer.readout.parameters()])
    assert per_step["lg-fg-w"] == 4 * (2 * 1 * 4 + 1) + 4 * (exact + 1)


def test_strip_nproc():
    assert strip_nproc(["train", "--nproc", "2", "--lr", "1", "--nproc=3"]) == ["train", "--lr", "1"]


def kill_rank_1_after_two_epochs(args: list[str], out: Path, wait: float) -> int:
    """Start `bpfree ARGS` on two ranks, kill -9 rank 1 once two epochs are written, check that rank 0 stops with
    exit 4 and one line within 25 s; returns the epochs the checkpoint holds."""
    procs = start_ranks([sys.executable, "-m", "bpfree", *args, "--epochs", "100000", "--dist-timeout", "10"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + wait
    while len(read_metrics(out / "metrics.jsonl")) < 2 and time.time() < deadline and procs[0].poll() is None:
        time.sleep(0.05)
    assert procs[0].poll() is None, procs[0].communicate()[1]
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    _, err = procs[0].communicate(timeout=30)  # bounded: gloo sees the closed connection (or --dist-timeout)
    procs[1].wait()
    assert procs[0].returncode == 4, err
    assert time.time() - killed < 25
    assert "bpfree: distributed:" in err and "Traceback" not in err
    done = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert done >= 2
    return done


@pytest.mark.slow
def test_dead_rank_stops_the_other_then_resume_continues(tmp_path, data_root):
    out = tmp_path / "run"
    # The recipe settings spelled out as TrainConfig's plain defaults: the run is compared with a TrainConfig run.
    args = ["train", "--data", "mnist", "--data-root", str(data_root), "--hidden", "16", "--batch-size", "64",
            "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--schedule", "constant",
            "--seed", "2", "--out", str(out)]
    done = kill_rank_1_after_two_epochs(args, out, wait=90)

    # Resume with the same number of ranks through the launcher; equals one uninterrupted single process.
    total = done + 2
    assert main([*args, "--epochs", str(total), "--resume", "--nproc", "2"]) == 0
    resumed = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in resumed] == list(range(1, total + 1))
    whole = train(TrainConfig(data="mnist", data_root=str(data_root), model_options={"hidden": HIDDEN}, batch_size=64,
                              seed=2, epochs=total, out=str(tmp_path / "whole")), show_progress=False)
    for a, b in zip(whole, resumed):
        for key in ("train_loss", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), (a["epoch"], key)


class RecordingGroup(Group):
    """Rank `rank` of a pretend 2-rank group that records what would be all-reduced (no processes needed)."""

    def __init__(self, rank: int = 0):
        super().__init__(rank=rank, world_size=2)
        self.reduced: list[list[tuple[int, ...]]] = []

    def weighted_mean_(self, tensors, weight) -> None:
        self.reduced.append([tuple(t.shape) for t in tensors])


def tiny_estimator(name: str, group: Group, **options):
    torch.manual_seed(0)
    model = models.build("mlp", 10, (1, 8, 8), hidden=HIDDEN)
    est = methods.build(name, model, seed=0, **options)
    est.group = group
    return est


def test_fgw_policy_reduces_k_numbers_in_step_and_the_readout_after():
    group = RecordingGroup()
    est = tiny_estimator("fg-w", group, tangents=4)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    est.step(x, y)
    assert group.reduced == [[(4,)]]  # inside step: only the K directional derivatives
    est.all_reduce_gradients(group, 6)
    assert group.reduced[1] == [(10, HIDDEN[-1]), (10,)]  # then only the exactly trained readout
    bp = tiny_estimator("bp", group)
    bp.step(x, y)
    bp.all_reduce_gradients(group, 6)
    assert group.reduced[2] == [tuple(p.shape) for p in bp.model.parameters()]  # default: every gradient


@pytest.mark.parametrize("name", ["fg-a", "lg-fg-a"])
def test_per_example_tangents_are_each_ranks_rows_of_the_global_batchs(name):
    """Each rank draws the tangents of the whole global batch and keeps its rows: the ranks' gradients, weighted by
    their shares, are the one-process gradient of the whole batch."""
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))

    def build(group: Group) -> methods.Estimator:
        torch.manual_seed(0)
        est = methods.build(name, models.build("mlp", 10, (1, 8, 8), hidden=(16, 16)), seed=0, tangents=2)
        est.group = group
        return est

    whole = build(LOCAL)
    whole.step(x, y)
    parts = []
    for rank, (start, stop) in enumerate(((0, 4), (4, 6))):
        est = build(RecordingGroup(rank))
        est.shard = Shard(start, stop, 6, stop - start)
        est.step(x[start:stop], y[start:stop])
        parts.append([p.grad * (stop - start) / 6 for p in est.trainable()])
    for expected, *shares in zip([p.grad for p in whole.trainable()], *parts):
        torch.testing.assert_close(sum(shares), expected, rtol=1e-5, atol=1e-6)


def test_localmixer_lg_fga_ranks_draw_independent_activity_tangents():
    """LocalMixer's lg-fg-a path offsets each rank's tangent stream (not the one-process tangents)."""
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    grads = []
    for group in (LOCAL, RecordingGroup(0), RecordingGroup(1)):
        torch.manual_seed(0)
        model = models.build("localmixer-m1-16", 10, (1, 8, 8), channels=16, groups=4)
        est = methods.build("lg-fg-a", model, seed=0)
        est.group = group
        est.step(x, y)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])  # rank 0 = a single process
    block = [n for n in grads[0] if n.startswith("blocks.") and n.endswith("weight")]
    assert block and all(not torch.equal(grads[0][n], grads[2][n]) for n in block)  # rank 1: other tangents
