"""bp and fa on `train --stages` (training/pipeline_bp.py, torch.distributed.pipelining): with one micro-batch the
staged run is one-process bp bit for bit (an MLP, resnet18 with batch norm, a user's ViT file); with several, on
models without batch norm, equal up to float summation order; a resumed run equals the straight one; a killed stage
stops the other (exit 4); bad combinations are refused with one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bpfree.cli import main
from bpfree.training.pipeline_bp import micro_batches
from bpfree.training.runfolder import read_metrics
from bpfree.training.train import TrainConfig, train
from tests.training.test_distributed import start_ranks
from tests.training.test_stages import BASE, RESNET, VIT, killed_then_resumed_equals_one_process, train_on_stages

WORKER = Path(__file__).with_name("stage_run_worker.py")
# (config, tolerance against one process: 0 = equal bits). BASE: SGD with momentum and weight decay, 200 examples
# in batches of 64 (the last of 8).
RUNS = {
    "bp-m1": (dict(method="bp", microbatches=1), 0),
    "fa-m1": (dict(method="fa", microbatches=1), 0),
    "bp-resnet-m1": (dict(method="bp", **RESNET, microbatches=1, train_size=128), 0),
    "bp-vit-m1": (dict(method="bp", model=VIT, model_options={}, microbatches=1, train_size=128), 0),
    # Several micro-batches: each micro-batch's gradient is summed (float summation order differs)
    "bp-m4-1f1b": (dict(method="bp", microbatches=4, pipeline_schedule="1f1b"), 1e-5),
    "fa-m2-gpipe": (dict(method="fa", microbatches=2, pipeline_schedule="gpipe"), 1e-5),
    # 3 does not divide 64: those batches run as 2 micro-batches
    "bp-m3": (dict(method="bp", microbatches=3), 1e-5),
    "bp-vit-m2": (dict(method="bp", model=VIT, model_options={}, microbatches=2, train_size=128), 1e-5),
    "bp-3-stages": (dict(method="bp", stages=3, microbatches=3), 1e-5),
    "bp-m2-resumed": (dict(method="bp", microbatches=2, epochs=1, resume_to=3), 1e-5),
}


def config(name: str, out: Path, root: Path) -> dict:
    return {"stages": 2, **BASE, **RUNS[name][0], "out": str(out / name), "data_root": str(root)}


@pytest.fixture(scope="module")
def pipelined_runs(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("pipeline")
    train_on_stages(WORKER, [config(n, out, data_root) for n in RUNS])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_pipelined_bp_equals_one_process(pipelined_runs, data_root, tmp_path, name):
    cfg, tolerance = config(name, pipelined_runs, data_root), RUNS[name][1]
    staged = torch.load(pipelined_runs / name / "checkpoint.pt", weights_only=True)
    kw = {k: v for k, v in cfg.items() if k not in ("stages", "resume_to", "microbatches", "pipeline_schedule")}
    kw["epochs"] = cfg.get("resume_to") or cfg["epochs"]
    train(TrainConfig(**{**kw, "out": str(tmp_path / "whole")}), show_progress=False)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert staged["epoch"] == whole["epoch"]
    for key, value in whole["model"].items():
        if tolerance == 0:
            assert torch.equal(staged["model"][key], value), key
        else:
            assert torch.allclose(staged["model"][key].float(), value.float(), rtol=0, atol=tolerance), key
    for a, b in zip(whole["records"], staged["records"]):
        for key in ("train_loss", "train_error", "test_loss", "test_error"):
            assert b[key] == pytest.approx(a[key], rel=max(tolerance, 1e-12), abs=1e-9), (a["epoch"], key)


@pytest.mark.slow
def test_pipelined_metrics_and_config(pipelined_runs):
    config_json = json.loads((pipelined_runs / "bp-m4-1f1b" / "config.json").read_text())
    assert config_json["microbatches"] == 4 and config_json["pipeline_schedule"] == "1f1b"
    assert config_json["stages"] == 2 and len(config_json["stage_split"].split(",")) == 1
    assert sum(config_json["stage_profile"]["stage_share"]) == pytest.approx(1, abs=1e-3)
    # one micro-batch given, no schedule: 1F1B needs as many micro-batches as stages, so GPipe
    assert json.loads((pipelined_runs / "bp-m1" / "config.json").read_text())["pipeline_schedule"] == "gpipe"
    records = read_metrics(pipelined_runs / "bp-m4-1f1b" / "metrics.jsonl")
    for s in (0, 1):
        assert records[-1][f"stage{s}_images_per_second"] > 0 and records[-1][f"stage{s}_peak_memory_mb"] > 0
        assert records[-1][f"stage{s}_busy_seconds"] > 0 and records[-1][f"stage{s}_idle_seconds"] >= 0
    # blocks of 16 floats: stage 0 sends the boundary forward, stage 1 its gradient back (200 examples, 4 steps)
    assert records[-1]["stage0_sent_bytes_per_step"] == pytest.approx(200 / 4 * 16 * 4)
    assert records[-1]["stage1_sent_bytes_per_step"] == pytest.approx(200 / 4 * 16 * 4)


@pytest.mark.slow
def test_resumed_pipeline_equals_the_straight_one(pipelined_runs, data_root, tmp_path):
    cfg = {**config("bp-m2-resumed", tmp_path, data_root), "epochs": 3}
    cfg.pop("resume_to")
    procs = start_ranks([sys.executable, str(WORKER), json.dumps([cfg])], stderr=subprocess.PIPE, text=True)
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    straight = torch.load(tmp_path / "bp-m2-resumed" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(pipelined_runs / "bp-m2-resumed" / "checkpoint.pt", weights_only=True)
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert [r["train_loss"] for r in straight["records"]] == [r["train_loss"] for r in resumed["records"]]


def test_micro_batches():
    assert micro_batches(64, 4) == 4
    assert micro_batches(64, 3) == 2  # the largest count up to 3 that divides 64
    assert micro_batches(8, 16) == 8
    assert micro_batches(7, 4) == 1


@pytest.mark.parametrize("args, message", [
    (["--method", "l-bp", "--stages", "2", "--microbatches", "2"], "are for bp and fa with --stages 2"),
    (["--method", "bp", "--pipeline-schedule", "gpipe"], "are for bp and fa with --stages 2"),
    (["--method", "bp", "--stages", "2", "--microbatches", "1", "--pipeline-schedule", "1f1b"],
     "1f1b needs at least as many micro-batches as stages"),
    (["--method", "bp", "--stages", "2", "--stage-mode", "pipelined"], "pipelined is for dfa, fdfa, fg-a, fg-w"),
])
def test_bad_combinations_refuse_with_one_line(args, message, capsys):
    assert main(["train", *args, "--data", "digits", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.slow
def test_killed_stage_stops_the_other_then_resume_continues(tmp_path, data_root):
    """kill -9 of stage 1, then --resume: the one-process run, bit for bit (one micro-batch)."""
    killed_then_resumed_equals_one_process(tmp_path, data_root, "bp", ["--warmup-epochs", "0", "--weight-decay", "0",
                                                                       "--microbatches", "1"], rel=0)
