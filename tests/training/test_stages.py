"""`train --stages S` (training/stages.py): two stages train exactly as one process (every staged rule, three models
including a user's file), a resumed staged run equals the uninterrupted one, a killed stage stops the other with
exit 4, and what cannot be staged is refused with one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bpfree.cli import main
from bpfree.core.errors import UsageError
from bpfree.training.runfolder import read_metrics
from bpfree.training.stage_plan import balanced_starts
from bpfree.training.stages import STAGED_RULES, check_stages
from bpfree.training.train import TrainConfig, train
from tests.training.test_distributed import ROOT, kill_rank_1_after_two_epochs, start_ranks

WORKER = Path(__file__).with_name("stage_worker.py")
VIT = f"{ROOT / 'examples' / 'vit.py'}:ViT"
# SGD with momentum and weight decay: per-parameter state that each stage keeps for its own parameters only.
BASE = dict(model="mlp", data="mnist", epochs=2, batch_size=64, train_size=200, seed=3, optimizer="sgd", lr=0.05,
            momentum=0.9, weight_decay=1e-4, model_options={"hidden": (16, 16, 16)})
RESNET = dict(model="resnet18", model_options={"width": 4})
RUNS = {
    # fg-a and fg-w on the MLP: one process runs their hand-written chain paths, stages the generic ones.
    **{rule: dict(method=rule) for rule in STAGED_RULES if rule not in ("fg-a", "fg-w")},
    "lg-fg-w-k2": dict(method="lg-fg-w", method_options={"tangents": 2}),
    # resnet18: sff splits its basic blocks into units (`between=`); lg-fg-a perturbs modules inside blocks (the
    # later stage draws and drops the earlier blocks' noise); l-fa's feedback inside convolutions; batch norm.
    "sff-resnet": dict(method="sff", **RESNET),
    "lg-fg-a-resnet": dict(method="lg-fg-a", **RESNET, method_options={"tangents": 2}),
    "l-fa-resnet": dict(method="l-fa", **RESNET),
    # A user's model file, found blocks (patch embedding, eight encoder layers), a split given by name.
    "l-bp-vit": dict(method="l-bp", model=VIT, model_options={}, split=["encoder.layers.5"]),
    "lg-fg-a-vit": dict(method="lg-fg-a", model=VIT, model_options={}),
    # dfa, synchronous: every stage gets the last stage's output error each step.
    "dfa-resnet": dict(method="dfa", **RESNET),
    "dfa-recompute-resnet": dict(method="dfa", **RESNET, method_options={"recompute": True}),
    "dfa-vit": dict(method="dfa", model=VIT, model_options={}),
    # fdfa and fg-a, synchronous: tangents ride beside the activations; the last stage's output error (and ẏ)
    # reaches every stage each step. fdfa learns every B from the shared ẏ; fg-a draws the earlier stages' tangents.
    "fdfa-resnet": dict(method="fdfa", **RESNET),
    "fdfa-recompute-resnet": dict(method="fdfa", **RESNET, method_options={"recompute": True,
                                                                          "feedback_timing": "after"}),
    "fdfa-vit": dict(method="fdfa", model=VIT, model_options={}),
    "fg-a-resnet": dict(method="fg-a", **RESNET, method_options={"aggregation": "sum"}),
    "fg-a-recompute-resnet": dict(method="fg-a", **RESNET, method_options={"recompute": True}),
    "fg-a-vit": dict(method="fg-a", model=VIT, model_options={}, method_options={"tangents": 2}),
    # fg-w (one tangent): every stage draws every weight's tangent; the boundary carries primal and tangent.
    "fg-w-resnet": dict(method="fg-w", **RESNET),
    "fg-w-vit": dict(method="fg-w", model=VIT, model_options={}),
    "fg-a-3": dict(method="fg-a", model=VIT, model_options={}, stages=3, train_size=128),
    "fg-w-3": dict(method="fg-w", model=VIT, model_options={}, stages=3, train_size=128),
    "l-bp-3": dict(method="l-bp", stages=3),
    # Pipelined with one batch per epoch: the pipeline drains after every batch, so stage 0's late update comes from
    # the same weights and error as the synchronous one: equal to one process. Checks what each late update does.
    **{f"{rule}-pipelined-1-step": dict(method=rule, **({} if rule == "dfa" else RESNET), mode="pipelined",
                                        train_size=BASE["batch_size"]) for rule in ("dfa", "fdfa", "fg-a", "fg-w")},
    # Stopped after one epoch, resumed to three: must equal three uninterrupted epochs.
    "l-bp-resumed": dict(method="l-bp", epochs=1, resume_to=3),
    "sff-resumed": dict(method="sff-block", epochs=1, resume_to=3),
}

# Pipelined: stage s updates from the error of the batch it ran S-1-s steps before (not the one-process run). Each
# is trained twice, straight through and stopped after one epoch then resumed: the two must be equal. The split is
# given: a pipelined run depends on which blocks wait how long, and the balanced split is profiled (timing).
PIPELINED = {
    "dfa-pipelined-3": dict(method="dfa", stages=3, mode="pipelined", epochs=3, split=["3", "5"]),
    # resnet18: blocks of several layers, whose backward needs weights the optimizer has changed since
    "dfa-pipelined-resnet": dict(method="dfa", **RESNET, mode="pipelined", epochs=3, train_size=128,
                                 split=["blocks.4"]),
    # fdfa: every stage learns every B from the late e and ẏ, in the batches' order: the B a checkpoint saves
    "fdfa-pipelined-resnet": dict(method="fdfa", **RESNET, mode="pipelined", epochs=3, train_size=128,
                                  split=["blocks.4"]),
    "fdfa-pipelined-3": dict(method="fdfa", stages=3, mode="pipelined", epochs=3, split=["3", "5"],
                             method_options={"feedback_timing": "after"}),
    # fg-w: stage 0 keeps the weight tangents it drew; the last stage sends d (K floats) per batch
    "fg-w-pipelined-resnet": dict(method="fg-w", **RESNET, mode="pipelined", epochs=3, train_size=128,
                                  split=["blocks.4"]),
    "fg-w-pipelined-3": dict(method="fg-w", stages=3, mode="pipelined", epochs=3, split=["3", "5"],
                             method_options={"aggregation": "orthogonal"}),
    "fg-a-pipelined-vit": dict(method="fg-a", model=VIT, model_options={}, mode="pipelined", epochs=3, train_size=128,
                               method_options={"tangents": 2}, split=["encoder.layers.4"]),
}
PIPELINED.update({f"{name}-resumed": {**kw, "epochs": 1, "resume_to": 3} for name, kw in PIPELINED.items()})
ALL = {**RUNS, **PIPELINED}


def config(name: str, out: Path, root: Path) -> dict:
    return {"stages": 2, **BASE, **ALL[name], "out": str(out / name), "data_root": str(root)}


def one_process(cfg: dict, out: Path) -> dict:
    kw = {k: v for k, v in cfg.items() if k not in ("stages", "split", "resume_to", "mode")}
    kw["epochs"] = cfg.get("resume_to") or cfg["epochs"]
    train(TrainConfig(**{**kw, "out": str(out)}), show_progress=False)
    return torch.load(out / "checkpoint.pt", weights_only=True)


def train_on_stages(worker: Path, configs: list[dict]) -> None:
    """Train `configs` with `worker`: one process group per stage count, so each count pays one start-up."""
    for world in sorted({c["stages"] for c in configs}):
        group = [c for c in configs if c["stages"] == world]
        procs = start_ranks([sys.executable, str(worker), json.dumps(group)], world=world,
                            stderr=subprocess.PIPE, text=True)
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err


@pytest.fixture(scope="module")
def staged_runs(tmp_path_factory, data_root):
    """RUNS trained once on stages."""
    out = tmp_path_factory.mktemp("stages")
    train_on_stages(WORKER, [config(n, out, data_root) for n in ALL])
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_stages_equal_one_process(staged_runs, data_root, tmp_path, name):
    cfg = config(name, staged_runs, data_root)
    staged = torch.load(staged_runs / name / "checkpoint.pt", weights_only=True)
    whole = one_process(cfg, tmp_path / "whole")
    assert staged["epoch"] == whole["epoch"]
    # Tolerance 1e-6 absolute; the runs do the same float operations in the same order (measured: equal bits).
    for key, value in whole["model"].items():
        assert torch.allclose(staged["model"][key].float(), value.float(), rtol=0, atol=1e-6), key
    for key, value in whole["estimator"]["parts"].items():  # heads, feedback matrices
        if isinstance(value, torch.Tensor):
            assert torch.allclose(staged["estimator"]["parts"][key].float(), value.float(), rtol=0, atol=1e-6), key
    for a, b in zip(whole["records"], staged["records"]):
        for key in a:
            if key not in ("seconds", "peak_memory_mb"):
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["epoch"], key)


@pytest.mark.parametrize("name", [n for n in PIPELINED if not n.endswith("-resumed")])
def test_pipelined_is_deterministic_and_resumes_exactly(staged_runs, name):
    straight = torch.load(staged_runs / name / "checkpoint.pt", weights_only=True)
    resumed = torch.load(staged_runs / f"{name}-resumed" / "checkpoint.pt", weights_only=True)
    assert straight["epoch"] == resumed["epoch"] == 3
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for a, b in zip(straight["records"], resumed["records"]):
        for key in ("train_loss", "train_error", "test_loss", "test_error"):
            assert b[key] == a[key], (a["epoch"], key)
    config_json = json.loads((staged_runs / name / "config.json").read_text())
    stages = config_json["stages"]
    assert config_json["stage_mode"] == "pipelined"
    assert config_json["stage_delays"] == list(range(stages - 1, -1, -1))


def test_pipelined_differs_from_synchronous(staged_runs):
    """The delay is real: pipelined dfa on three stages is not the synchronous (= one-process) run."""
    pipelined = read_metrics(staged_runs / "dfa-pipelined-3" / "metrics.jsonl")
    synchronous = read_metrics(staged_runs / "dfa" / "metrics.jsonl")
    assert pipelined[0]["train_loss"] != synchronous[0]["train_loss"]


def test_staged_metrics_and_config(staged_runs):
    config_json = json.loads((staged_runs / "l-bp-vit" / "config.json").read_text())
    assert config_json["stages"] == 2 and config_json["stage_split"] == "encoder.layers.5"
    assert config_json["stage_blocks"][1][0] == "encoder.layers.5"
    assert sum(config_json["stage_profile"]["stage_share"]) == pytest.approx(1, abs=1e-3)
    records = read_metrics(staged_runs / "l-bp" / "metrics.jsonl")
    for s in (0, 1):
        assert records[-1][f"stage{s}_images_per_second"] > 0
        assert records[-1][f"stage{s}_busy_seconds"] > 0 and records[-1][f"stage{s}_idle_seconds"] >= 0
        assert records[-1][f"stage{s}_cpu_seconds"] > 0
    # Stage 0 sends its last block's output (batch x 16 floats per step); the last stage sends nothing.
    assert records[-1]["stage0_sent_bytes_per_step"] == pytest.approx(200 / 4 * 16 * 4)
    assert records[-1]["stage1_sent_bytes_per_step"] == 0
    three = json.loads((staged_runs / "l-bp-3" / "config.json").read_text())
    assert [len(b) for b in three["stage_blocks"]] == [1, 1, 1]


def test_bad_split_is_one_line_on_every_stage(staged_runs):
    first = staged_runs / next(iter(RUNS))
    for r in (0, 1):
        assert "--stage-split: 'no.such.block' is not a block" in (first / f"rank{r}.error").read_text()


def test_balanced_starts():
    assert balanced_starts([1, 1, 1, 1], 2) == [0, 2]
    assert balanced_starts([5, 1, 1, 1, 1, 1], 2) == [0, 1]
    assert balanced_starts([1, 2, 3, 4, 5, 6], 3) == [0, 3, 5]  # 6 | 9 | 6: no split does better than 9
    assert balanced_starts([3, 1], 2) == [0, 1]
    with pytest.raises(UsageError, match="has 2 blocks"):
        balanced_starts([1, 1], 3)


@pytest.mark.parametrize("method", ["ff"])  # bp, fa: tests/training/test_pipeline_bp.py
def test_rules_that_cannot_be_staged_refuse_with_one_line(method, capsys):
    assert main(["train", "--method", method, "--stages", "2", "--data", "digits", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{method} cannot be staged" in err[0]


@pytest.mark.parametrize("flags, said", [
    (["--method", "fg-a", "--aggregation", "orthogonal"], "fg-a's orthogonal aggregation projects"),
    (["--method", "fg-w", "--tangents", "2"], "fg-w with --tangents > 1"),
])
def test_method_options_that_cannot_be_staged_refuse_before_any_process_starts(flags, said, capsys):
    assert main(["train", *flags, "--stages", "2", "--data", "digits", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0]


def test_bad_stage_options_refuse():
    with pytest.raises(UsageError, match="--stages with --nproc"):
        check_stages("lg-fg-w", 2, 2, None)  # replicas of each stage: tests/training/test_stage_replicas.py
    with pytest.raises(UsageError, match="2 names, got 1"):
        check_stages("l-bp", 3, 1, ("a",))
    with pytest.raises(UsageError, match="--stage-split needs --stages"):
        check_stages("l-bp", 1, 1, ("a",))
    with pytest.raises(UsageError, match="at least 1"):
        check_stages("l-bp", 0, 1, None)
    with pytest.raises(UsageError, match="pipelined is for dfa, fdfa, fg-a, fg-w"):
        check_stages("l-bp", 2, 1, None, "pipelined")
    with pytest.raises(UsageError, match="--recompute true is for the synchronous mode"):
        check_stages("dfa", 2, 1, None, "pipelined", {"recompute": True})
    with pytest.raises(UsageError, match="--stage-mode needs --stages 2"):
        check_stages("dfa", 1, 1, None, "pipelined")
    with pytest.raises(UsageError, match="each stage is a process"):  # the one-process loop never ignores --stages
        train(TrainConfig(stages=2, out="unused"), show_progress=False)


def killed_then_resumed_equals_one_process(tmp_path: Path, data_root: Path, method: str, flags: list[str],
                                           rel: float) -> None:
    """kill -9 of stage 1 mid-run: stage 0 stops with exit 4; --resume through the launcher then gives the
    one-process run's metrics (to `rel`)."""
    out = tmp_path / "run"
    args = ["train", "--method", method, "--data", "mnist", "--data-root", str(data_root), "--hidden", "16,16",
            "--batch-size", "64", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--schedule",
            "constant", "--seed", "2", "--out", str(out), "--stages", "2", *flags]
    done = kill_rank_1_after_two_epochs(args, out, wait=120)
    total = done + 2
    assert main([*args, "--epochs", str(total), "--resume"]) == 0
    resumed = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in resumed] == list(range(1, total + 1))
    whole = train(TrainConfig(method=method, data="mnist", data_root=str(data_root),
                              model_options={"hidden": (16, 16)}, batch_size=64, seed=2, epochs=total,
                              optimizer="sgd", lr=0.05, momentum=0.9, schedule="constant",
                              out=str(tmp_path / "whole")), show_progress=False)
    for a, b in zip(whole, resumed):
        for key in ("train_loss", "test_loss", "test_error"):
            assert b[key] == pytest.approx(a[key], rel=rel, abs=0), (a["epoch"], key)


def test_killed_stage_stops_the_other_then_resume_continues(tmp_path, data_root):
    killed_then_resumed_equals_one_process(tmp_path, data_root, "l-bp", [], rel=1e-6)


@pytest.mark.parametrize("method", ["l-bp", pytest.param("bp", marks=pytest.mark.slow)])  # bp: PyTorch's pipeline
def test_a_diverging_stage_writes_failed_json_and_exits_3(method, tmp_path, data_root, capsys):
    """The last stage sees the loss become NaN: it writes failed.json (as one process does) and the run exits 3 (the
    first stage, which only loses its peer, exits 4)."""
    out = tmp_path / "run"
    code = main(["train", "--method", method, "--data", "mnist", "--data-root", str(data_root), "--hidden", "16,16",
                 "--optimizer", "sgd", "--lr", "1e30", "--epochs", "2", "--out", str(out), "--stages", "2"])
    assert code == 3, capsys.readouterr().err
    failed = json.loads((out / "failed.json").read_text())
    assert failed["kind"] == "diverged" and "loss became" in failed["detail"]


@pytest.mark.slow
def test_lr_auto_is_probed_once_before_a_staged_run(tmp_path):
    """--lr auto with --stages: stage 0 probes the rule (in one process, the whole model), every stage trains at its
    choice, and config.json records the probe."""
    out = tmp_path / "run"
    assert main(["train", "--method", "l-bp", "--data", "digits", "--hidden", "16,16", "--batch-size", "32",
                 "--epochs", "10", "--lr", "auto", "--out", str(out), "--stages", "2"]) == 0
    config = json.loads((out / "config.json").read_text())
    probe = config["lr_probe"]
    assert config["lr_auto"] and len(probe["grid"]) >= 2 and config["lr"] == probe["choice"]


class Skip(torch.nn.Module):
    """Three blocks; block 0's output also skips past blocks 1 and 2 to the readout."""

    input_shape = (6,)

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(6, 6) for _ in range(3))
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        return self.head(self.c(self.b(h)) + h)


def test_a_split_the_forward_carries_other_values_across_is_refused():
    from bpfree.methods import build
    from bpfree.training.stage_plan import ownership

    est = build("l-bp", Skip(), blocks=("a", "b", "c"))
    owners = ownership(est, [0, 1])  # the skip starts at block a's output, which stage 2 receives: fine
    names = [n for n, _ in est.model.named_parameters()]
    assert [owners[names.index(n)] for n in ("a.weight", "b.weight", "c.weight", "head.weight")] == [0, 1, 1, 1]
    with pytest.raises(UsageError, match="does not reproduce the model from the previous block's output"):
        ownership(est, [0, 2])  # stage 2 would need block a's output too
