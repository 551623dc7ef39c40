"""`--stages S --nproc R` (training/stage_replicas.py): R data-parallel replicas of each stage train as one process
(up to float summation order: each replica's gradient over its rows, averaged); a resumed run equals the straight
one; the rules that share the last stage's signal (dfa, fdfa, fg-a, fg-w) share it within each replica's pipeline;
what is still refused says so in one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bpfree.core.errors import UsageError
from bpfree.methods import forward_gradient
from bpfree.training.stage_replicas import SIGNAL_RULES
from bpfree.training.stages import check_stages
from bpfree.training.train import TrainConfig, train
from tests.training.test_distributed import start_ranks
from tests.training.test_stages import BASE, RESNET

WORKER = Path(__file__).with_name("stage_run_worker.py")
RUNS = {
    "l-bp": dict(method="l-bp"),
    "l-fa": dict(method="l-fa"),
    "lg-bp": dict(method="lg-bp"),
    # per-example noise: each replica draws the whole batch's and keeps its rows
    "lg-fg-a": dict(method="lg-fg-a", method_options={"tangents": 2}),
    "sff-block": dict(method="sff-block"),
    # bp / fa: each replica runs its own pipeline on its rows (PyTorch's engine on the replica's process group)
    "bp-m1": dict(method="bp", microbatches=1),
    "fa-m2-gpipe": dict(method="fa", microbatches=2, pipeline_schedule="gpipe"),
    "sff-resnet": dict(method="sff", **RESNET, train_size=64, epochs=1),  # layer-wise units inside basic blocks
    "l-bp-resnet": dict(method="l-bp", **RESNET, train_size=64, epochs=1),
    "l-bp-resumed": dict(method="l-bp", epochs=1, resume_to=3),
    # the last stage's e (and ẏ, d) broadcast within each replica's pipeline; fdfa's mean(ẏ uᵀ) for B (Adam: not
    # linear in it) and fg-w's K numbers d averaged over the stage's replicas inside the step; fg-a's per-example
    # tangents: each replica's rows of the whole batch's
    **{rule: dict(method=rule) for rule in SIGNAL_RULES},
    "fg-a-k2-sum": dict(method="fg-a", method_options={"tangents": 2, "aggregation": "sum"}),
    # (a smaller step: at lr 0.05 dfa and fg-w diverge by the third epoch, where float rounding grows without bound)
    **{f"{rule}-resumed": dict(method=rule, epochs=1, resume_to=3, lr=0.01) for rule in SIGNAL_RULES},
}


def config(name: str, out: Path, root: Path) -> dict:
    return {"stages": 2, "replicas": 2, **BASE, **RUNS[name], "out": str(out / name), "data_root": str(root)}


@pytest.fixture(scope="module")
def replicated_runs(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("replicas")
    configs = [config(n, out, data_root) for n in RUNS]
    procs = start_ranks([sys.executable, str(WORKER), json.dumps(configs)], world=4, stderr=subprocess.PIPE,
                        text=True)
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in RUNS if not n.endswith("-resnet")])
def test_replicated_stages_equal_one_process(replicated_runs, data_root, tmp_path, monkeypatch, name):
    # fg-a and fg-w: one process would run the MLP's hand-written chain path (its own tangent stream); stages run
    # the generic one, so the reference does too
    monkeypatch.setattr(forward_gradient, "_chain", lambda model: None)
    cfg = config(name, replicated_runs, data_root)
    staged = torch.load(replicated_runs / name / "checkpoint.pt", weights_only=True)
    kw = {k: v for k, v in cfg.items() if k not in ("stages", "replicas", "resume_to")}
    kw["epochs"] = cfg.get("resume_to") or cfg["epochs"]
    train(TrainConfig(**{**kw, "out": str(tmp_path / "whole")}), show_progress=False)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert staged["epoch"] == whole["epoch"]
    for key, value in whole["model"].items():
        assert torch.allclose(staged["model"][key].float(), value.float(), rtol=0, atol=1e-5), key
    for key, value in whole["estimator"]["parts"].items():  # heads, feedback matrices
        if isinstance(value, torch.Tensor):
            assert torch.allclose(staged["estimator"]["parts"][key].float(), value.float(), rtol=0, atol=1e-5), key
    for a, b in zip(whole["records"], staged["records"]):
        for key in ("train_loss", "train_error", "test_loss", "test_error"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), (a["epoch"], key)
    config_json = json.loads((replicated_runs / name / "config.json").read_text())
    assert config_json["stages"] == 2 and config_json["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["l-bp-resnet", "sff-resnet"])
def test_replicas_of_a_batch_norm_model_train(replicated_runs, name):
    """Batch norm normalises each replica's rows by their own statistics (as data-parallel ranks do), so a BN model
    is not one process's numbers; it trains, and the replicas agree (one checkpoint, finite metrics)."""
    state = torch.load(replicated_runs / name / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v.float()).all() for v in state["model"].values())
    assert len(state["rank_states"]) == 4 and 0 <= state["records"][-1]["train_error"] <= 100


def test_rules_that_need_more_than_the_average_refuse_replicas():
    with pytest.raises(UsageError, match="--stages with --nproc .* is for l-bp.*; not lg-fg-w yet"):
        check_stages("lg-fg-w", 2, 2, None)
    for rule in SIGNAL_RULES:
        check_stages(rule, 2, 2, None)
        with pytest.raises(UsageError, match="--stages with --nproc runs --stage-mode synchronous"):
            check_stages(rule, 2, 2, None, "pipelined")
        check_stages(rule, 2, 1, None, "pipelined")
    check_stages("bp", 2, 2, None)
    check_stages("l-bp", 2, 2, None)


def test_too_many_processes_name_both_flags(capsys):
    from bpfree.cli import main

    assert main(["train", "--method", "l-bp", "--stages", "4096", "--nproc", "1", "--data", "digits",
                 "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stages 4096 x --nproc 1 processes" in err[0]
