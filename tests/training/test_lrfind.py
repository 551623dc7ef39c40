"""The learning-rate finder (bpfree/training/lrfind.py), `bpfree lr-find` and `--lr auto`: the choice is deterministic,
uses no test example, fits its budget, survives diverging grid points, and a resumed run reuses it.

All on the offline digits data set (or a tiny numbered data set) with tiny models and a few steps.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from bpfree.cli import main
from bpfree.data import TensorData
from bpfree.training import lrfind, recipes
from bpfree.training.train import TrainConfig, lr_origin

TINY = ["--model", "mlp", "--hidden", "16", "--data", "digits", "--threads", "1"]
USER = ["--model", "examples/lr_suite.py:LayerNormMLP", "--data", "digits", "--threads", "1"]  # no recipe entry


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(method="bp", model="mlp", data="digits", optimizer="adam", lr=3e-3, batch_size=32, epochs=30,
                model_options={"hidden": (16,)}, lr_auto=True, out="unused")
    return TrainConfig(**{**base, **kw})


def test_same_seed_gives_the_same_choice_and_another_seed_its_own_probe(digits):
    cfg = tiny_cfg()
    a = lrfind.find(cfg, digits, grid=(1e-3, 1e-2, 1e-1), steps=12, show_progress=False)
    b = lrfind.find(cfg, digits, grid=(1e-3, 1e-2, 1e-1), steps=12, show_progress=False)
    assert a.choice == b.choice and a.record()["val_loss"] == b.record()["val_loss"]
    c = lrfind.find(replace(cfg, seed=1), digits, grid=(1e-3, 1e-2, 1e-1), steps=12, show_progress=False)
    assert c.record()["val_loss"] != a.record()["val_loss"]  # the seed reaches the probe's models


class Recorder(nn.Module):
    """A linear classifier that records the id (feature 0) of every example it sees, by mode."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...]):
        super().__init__()
        self.fc = nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)
        self.seen: dict[bool, list[int]] = {True: [], False: []}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen[self.training] += x[:, 0].round().long().tolist()
        return self.fc(x.flatten(1) / 100)


def numbered(n_train: int = 600, n_test: int = 100) -> TensorData:
    """Feature 0 of training example i is i; of test example j it is -(j + 1): every example seen is known."""
    def make(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(len(ids), 4, generator=torch.Generator().manual_seed(0))
        x[:, 0] = ids.float()
        return x, (ids.abs() % 3)
    return TensorData("numbered", *make(torch.arange(n_train)), *make(-1 - torch.arange(n_test)), 3)


def test_the_probe_touches_no_test_example_and_validates_on_held_out_training_examples(monkeypatch):
    data = numbered()
    built: list[Recorder] = []

    def build(name, num_classes, input_shape, **options):
        built.append(Recorder(num_classes, input_shape))
        return built[-1]

    monkeypatch.setattr(lrfind.models, "build", build)
    cfg = tiny_cfg(model="recorder", model_options={}, epochs=40)
    probe = lrfind.find(cfg, data, show_progress=False)
    assert probe.points and probe.val_indices is not None
    held = set(probe.val_indices)
    assert len(held) == probe.val_examples and held <= set(range(data.num_train))
    for model in built:
        trained, validated = set(model.seen[True]), set(model.seen[False])
        assert min(trained | validated) >= 0, "the probe saw a test example"
        assert validated == held and not trained & held  # validation only on the held-out training examples
    # The work done is what the budget allowed: training examples + a third of each validation pass.
    work = sum(len(m.seen[True]) + lrfind.EVAL_COST * len(m.seen[False]) for m in built)
    assert work <= probe.budget["allowed_examples"] == int(0.1 * cfg.epochs * data.num_train)


@pytest.mark.parametrize("epochs,train", [(1, 1437), (5, 1437), (40, 1137), (200, 50000), (3, 60000)])
def test_the_probe_plan_never_exceeds_a_tenth_of_the_planned_training(epochs, train):
    probe = TensorData("x", torch.zeros(train - train // 6, 4), torch.zeros(train - train // 6, dtype=torch.long),
                       torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 10, None,
                       torch.zeros(min(1000, train // 6), 4), torch.zeros(min(1000, train // 6), dtype=torch.long))
    cfg = tiny_cfg(epochs=epochs, batch_size=128)
    lrs, steps, budget = lrfind.plan(cfg, train, probe)
    cost = len(lrs) * (steps * 128 + lrfind.EVAL_COST * probe.num_val) + lrfind.EVAL_COST * probe.num_val
    assert cost <= 0.1 * epochs * train
    assert (lrs == [] and steps == 0) or (len(lrs) >= 2 and lrfind.MIN_STEPS <= steps <= lrfind.MAX_STEPS)
    if lrs:
        assert cfg.lr in lrs and len(lrs) <= lrfind.POINTS  # the prior and its neighbours, fewer when short


def test_a_diverging_grid_point_is_an_answer_not_a_crash(digits):
    cfg = tiny_cfg(optimizer="sgd", momentum=0.9)
    probe = lrfind.find(cfg, digits, grid=(1e-2, 1e5), steps=10, show_progress=False)
    assert probe.points[1].status.startswith("diverged") and probe.points[0].ok
    assert probe.choice == 1e-2
    assert "diverged" in lrfind.table(probe)
    every = lrfind.find(cfg, digits, grid=(1e5, 1e6), steps=10, show_progress=False)
    assert not any(p.ok for p in every.points) and every.choice == 1e4  # below the grid


def test_lr_auto_records_the_probe_and_resume_reuses_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "bp", *USER, "--epochs", "12", "--batch-size", "16", "--schedule", "constant"]
    assert main(args + ["--out", str(out)]) == 0  # no --lr and no validated recipe: auto by default
    config = json.loads((out / "config.json").read_text())
    probe = config["lr_probe"]
    assert config["lr_auto"] and probe["grid"] and config["lr"] == probe["choice"]
    assert set(probe) >= {"grid", "val_loss", "val_error", "choice", "seconds", "budget"}
    assert (out / lrfind.PROBE_PLOT).exists()
    assert "found by the lr finder" in capsys.readouterr().out
    same = tmp_path / "again"
    assert main(args + ["--out", str(same)]) == 0  # the same seed: the same choice
    assert json.loads((same / "config.json").read_text())["lr"] == config["lr"]

    def no_probe(*a, **k):
        raise AssertionError("a resumed run probed again")

    monkeypatch.setattr(lrfind, "find", no_probe)
    assert main(args[:-4] + ["--epochs", "13", "--batch-size", "16", "--schedule", "constant", "--resume",
                             "--out", str(out)]) == 0
    resumed = json.loads((out / "config.json").read_text())
    assert resumed["lr"] == config["lr"] and resumed["lr_probe"] == probe


def test_a_short_run_trains_with_the_rules_prior_and_a_validated_recipe_is_not_probed(tmp_path):
    assert main(["train", "--method", "fa", *USER, "--epochs", "1", "--out", str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["lr_auto"] and config["lr_probe"]["grid"] == [] and config["lr"] == recipes.PRIORS["fa"]
    assert config["optimizer"] == "adam" and config["recipe"]["entry"] == "fa/*"
    assert main(["train", "--method", "bp", *TINY, "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert not config["lr_auto"] and config["lr_probe"] is None  # bp/mlp is validated: its recipe's rate


def test_a_diverged_run_says_which_rate_and_how_it_was_chosen(tmp_path, capsys):
    code = main(["train", "--method", "bp", *TINY, "--epochs", "2", "--optimizer", "sgd", "--lr", "1e12",
                 "--out", str(tmp_path / "d")])
    assert code == 3 and "lr 1e+12 was given with --lr" in capsys.readouterr().err
    cfg = tiny_cfg(lr_probe={"grid": [1e-3, 1e-2], "choice": 1e-2}, lr=1e-2)
    assert lr_origin(cfg) == "lr 0.01 was the lr finder's choice (lr_probe in config.json)"
    assert "from the recipe bp/mlp" in lr_origin(tiny_cfg(lr_auto=False, recipe={"entry": "bp/mlp", "overridden": []}))


def test_lr_find_prints_plots_and_writes_the_probe(tmp_path, capsys):
    out = tmp_path / "lf"
    assert main(["lr-find", "--method", "dfa", *USER, "--lr-grid", "1e-3,1e-2", "--steps-per-point", "10",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 0.001 |" in printed and "chosen lr" in printed and (out / "lr_find.png").stat().st_size > 1000
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved["probe"]["grid"] == [1e-3, 1e-2] and saved["probe"]["choice"] in (1e-3, 1e-2)
    assert main(["lr-find", "--method", "bp", *USER, "--lr-grid", "x", "--out", str(out)]) == 2
    assert main(["lr-find", "--method", "bp", *USER, "--epochs", "1", "--out", str(out)]) == 2  # budget too small
    assert capsys.readouterr().err.count("\n") == 2  # one line each


def test_compare_resolves_lr_auto_per_method(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "bp,fa", *TINY, "--epochs", "12", "--batch-size", "16",
                 "--lr", "auto", "--out", str(out), "--no-plots"]) == 0
    for method in ("bp", "fa"):
        config = json.loads((out / method / "seed-0" / "config.json").read_text())
        assert config["lr_auto"] and config["lr"] == config["lr_probe"]["choice"]
    # Rerunning skips the finished runs: their recorded choices are reused, nothing is refused.
    assert main(["compare", "--methods", "bp,fa", *TINY, "--epochs", "12", "--batch-size", "16",
                 "--lr", "auto", "--out", str(out), "--no-plots"]) == 0


def test_choose_keeps_the_prior_unless_a_rate_is_clearly_better_and_ignores_diverged_points():
    points = [lrfind.Point(1e-3, 2.30, 88.0), lrfind.Point(1e-2, 2.00, 89.0), lrfind.Point(3e-2, 0.1, 1.0, "diverged")]
    assert lrfind.choose(points, 300, 1e-3)[0] == 1e-2  # the error alone (88 vs 89 %) is noise at this point
    close = [lrfind.Point(1e-3, 2.30, 88.0), lrfind.Point(1e-2, 2.30 * (1 - lrfind.MARGIN) + 1e-6, 80.0)]
    choice, reason = lrfind.choose(close, 300, 1e-3)
    assert choice == 1e-3 and "prior" in reason  # within the margin: the prior stands
    assert lrfind.choose(close, 300, 1e-2)[0] == 1e-2  # the prior is the better one
    diverged_prior = [lrfind.Point(1e-3, 2.2, 80.0), lrfind.Point(1e-2, status="diverged: x")]
    assert lrfind.choose(diverged_prior, 300, 1e-2, untrained=2.3)[0] == 1e-3
    # The prior not probed (lr-find --lr-grid): the lowest loss (ties: the lower rate), unless nothing was learnt
    # measurably (the untrained loss is 2.30): then the prior, not the grid's accidental minimum.
    assert lrfind.choose([lrfind.Point(1e-3, 2.2, 50.0), lrfind.Point(1e-2, 2.2, 40.0)], 300, 3e-3)[0] == 1e-3
    flat = [lrfind.Point(1e-4, 2.295, 88.0), lrfind.Point(1e-3, 2.31, 89.0)]
    assert lrfind.choose(flat, 300, 3e-3, untrained=2.30)[0] == 3e-3
    assert "prior" in lrfind.choose(flat, 300, 3e-3, untrained=2.30)[1]
    assert lrfind.choose(flat, 300, 3e-3, untrained=2.40)[0] == 1e-4
    # Where no rate beat the untrained model (2.30): a prior whose validation loss blew up (3x) or that diverged
    # gives way to a clearly lower loss; a prior merely worse than the untrained model after the probe stands (the
    # delayed rules), and so does a prior whose loss blew up as much as every other rate's.
    assert lrfind.choose([lrfind.Point(1e-2, 2.87, 88.0), lrfind.Point(3e-2, 37.6, 90.0)], 300, 3e-2, 2.30)[0] == 1e-2
    assert lrfind.choose([lrfind.Point(1e-2, 2.4, 88.0), lrfind.Point(3e-2, status="diverged: x")], 300, 3e-2,
                         2.30)[0] == 1e-2
    assert lrfind.choose([lrfind.Point(3e-3, 2.32, 88.0), lrfind.Point(1e-2, 2.64, 90.0)], 300, 1e-2, 2.30)[0] == 1e-2
    assert lrfind.choose([lrfind.Point(1e-2, 82.9, 88.0), lrfind.Point(3e-2, 1026.0, 90.0)], 300, 1e-2, 2.30)[0] == 1e-2


def test_the_default_probe_tries_the_prior_and_its_grid_neighbours(digits):
    cfg = tiny_cfg(lr=1e-3, epochs=40)
    lrs, steps, _ = lrfind.plan(cfg, digits.num_train, lrfind.probe_data(cfg, digits)[0])
    assert lrs == [3e-4, 1e-3, 3e-3] and steps >= lrfind.MIN_STEPS
    edge = tiny_cfg(lr=3e-2, epochs=40)
    assert lrfind.plan(edge, digits.num_train, lrfind.probe_data(edge, digits)[0])[0] == [3e-3, 1e-2, 3e-2]


def test_nothing_to_probe_on_is_the_rules_prior_not_an_error():
    from types import SimpleNamespace

    streamed = SimpleNamespace(num_train=5000)  # an image folder: not held in memory
    probe = lrfind.find(tiny_cfg(), streamed, show_progress=False)
    assert probe.points == [] and probe.choice == tiny_cfg().lr and "prior" in probe.reason
    few = numbered(n_train=40)  # too few training examples to hold out a split
    assert lrfind.find(tiny_cfg(), few, show_progress=False).points == []


def test_a_folder_in_use_is_refused_before_probing(tmp_path, monkeypatch, capsys):
    from bpfree.training.runfolder import RunLock

    def no_probe(*a, **k):
        raise AssertionError("probed a folder in use")

    monkeypatch.setattr(lrfind, "find", no_probe)
    out = tmp_path / "run"
    with RunLock(out):
        code = main(["train", "--method", "bp", *USER, "--epochs", "12", "--batch-size", "16", "--out", str(out)])
    assert code == 2 and "in use by another bpfree process" in capsys.readouterr().err
    assert not (out / lrfind.PROBE_PLOT).exists()


RANK_LOGGER = '''
import os
import torch
from torch import nn

LOG = {log!r}


class Net(nn.Module):
    """A linear classifier that logs each construction and, at each training step, its weights' sum, with its rank."""

    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.fc = nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)
        self.write("built")

    def write(self, what):
        with open(LOG, "a") as f:
            f.write(f"{{os.environ.get('RANK')}} {{what}}\\n")

    def forward(self, x):
        if self.training:
            self.write(f"weights {{float(self.fc.weight.double().sum()):.12e}}")
        return self.fc(x.flatten(1))
'''


def two_ranks(args: list[str]) -> list[tuple[int, str]]:
    """`python -m bpfree ARGS` as ranks 0 and 1 of a torchrun-style group; each rank's exit code and stderr."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-m", "bpfree", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={
        **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r), "WORLD_SIZE": "2",
        "LOCAL_RANK": str(r), "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}) for r in (0, 1)]
    return [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=120)]]


def test_data_parallel_only_rank0_probes_and_every_rank_trains_with_its_choice(tmp_path):
    log = tmp_path / "log.txt"
    (tmp_path / "net.py").write_text(RANK_LOGGER.format(log=str(log)))
    out = tmp_path / "run"
    for code, err in two_ranks(["train", "--method", "bp", "--model", f"{tmp_path / 'net.py'}:Net", "--data",
                                "digits", "--epochs", "12", "--batch-size", "16", "--schedule", "constant",
                                "--threads", "1", "--out", str(out)]):
        assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    probe = config["lr_probe"]
    assert config["lr_auto"] and probe["grid"] and config["lr"] == probe["choice"]
    lines = [line.split(" ", 1) for line in log.read_text().splitlines()]
    built = {r: sum(1 for rank, what in lines if rank == r and what == "built") for r in ("0", "1")}
    # rank 0: the look for batch norm (bp has a factor) + untrained + each point + the run; rank 1: the run
    assert built == {"0": len(probe["grid"]) + 3, "1": 1}
    # Both ranks applied the same updates, so the same rate: their weights agree at the last step (differing rates
    # would part them from the second step on).
    final = {r: [what for rank, what in lines if rank == r and what.startswith("weights")][-1] for r in ("0", "1")}
    assert final["0"] == final["1"]


def test_data_parallel_a_probe_refused_on_rank0_stops_every_rank_with_its_message(tmp_path):
    from bpfree.training.runfolder import RunLock

    out = tmp_path / "run"
    with RunLock(out):  # another process holds the folder: rank 0 refuses before probing
        results = two_ranks(["train", "--method", "bp", *USER, "--epochs", "12", "--out", str(out)])
    assert [code for code, _ in results] == [2, 2]
    assert all("in use by another bpfree process" in err for _, err in results)
    assert not (out / lrfind.PROBE_PLOT).exists()


def test_a_model_with_batch_norm_starts_from_the_rules_batch_norm_prior_unless_the_user_chose(tmp_path):
    bn = ["--model", "examples/lr_suite.py:ResBNCNN", "--data", "digits", "--threads", "1", "--epochs", "1"]
    assert main(["train", "--method", "lg-fg-a", *bn, "--out", str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    expected = recipes.auto_prior("lg-fg-a", recipes.PRIORS["lg-fg-a"], True, lrfind.GRID)
    assert recipes.BATCH_NORM_FACTORS["lg-fg-a"] > 1 and expected > recipes.PRIORS["lg-fg-a"]
    assert config["lr"] == expected and "batch norm" in config["lr_probe"]["prior"]["from"]
    # The same rule on a model without batch norm, and an lr-find prior given by the user: no factor.
    assert main(["train", "--method", "lg-fg-a", *USER, "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["lr"] == recipes.PRIORS["lg-fg-a"]
    cfg = tiny_cfg(method="lg-fg-a", lr=1e-3, recipe={"entry": "lg-fg-a/*", "overridden": ["lr"]})
    assert lrfind.starting_rate(cfg, object())[0] == 1e-3
    assert recipes.auto_prior("fa", 1e-2, True, lrfind.GRID) == 1e-2  # a rule without a factor
    assert recipes.auto_prior("bp", 3e-3, True, lrfind.GRID) == 1e-2  # x3 on the 1-3-10 grid: the next point
    assert recipes.auto_prior("fdfa", 1e-2, True, lrfind.GRID) == 3e-2  # at most the grid's top
    assert recipes.auto_prior("fdfa", 1e-2, False, lrfind.GRID) == 1e-2


def test_fg_a_starts_from_a_prior_scaled_by_the_models_size_and_records_it(tmp_path):
    scale = recipes.SIZE_SCALED_PRIORS["fg-a"]
    # scale / sqrt(parameters) to the nearest grid rate, batch norm or not; no size given: the rule's prior.
    assert recipes.auto_prior("fg-a", 3e-3, False, lrfind.GRID, round((scale / 3e-3) ** 2)) == 3e-3
    assert recipes.auto_prior("fg-a", 3e-3, True, lrfind.GRID, round((scale / 3e-4) ** 2)) == 3e-4
    assert recipes.auto_prior("fg-a", 3e-3, True, lrfind.GRID, 10) == lrfind.GRID[-1]  # at most the grid's top
    assert recipes.auto_prior("fg-a", 3e-3, True, lrfind.GRID) == 3e-3
    # The residual CNN (307,690 parameters: 0.2 / sqrt of it = 3.6e-4) and a suite model of 5,122.
    for model, parameters, expected in (("examples/residual_cnn.py:ResidualCNN", 307_690, 3e-4),
                                        ("examples/lr_suite.py:ResBNCNN", 5_122, 3e-3)):
        out = tmp_path / model.split(":")[1]
        run = ["--model", model, "--data", "digits", "--threads", "1", "--epochs", "1", "--out", str(out)]
        assert main(["train", "--method", "fg-a", *run]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["lr"] == expected == recipes.auto_prior("fg-a", 3e-3, True, lrfind.GRID, parameters)
        assert config["lr_probe"]["prior"]["lr"] == expected
        assert f"sqrt({parameters:,} parameters)" in config["lr_probe"]["prior"]["from"]
    # A rate or optimizer the user chose is used as it is.
    cfg = tiny_cfg(method="fg-a", lr=1e-2, recipe={"entry": "fg-a/*", "overridden": ["lr"]})
    assert lrfind.starting_rate(cfg, object())[0] == 1e-2


def test_fg_a_s_size_scaled_prior_keeps_the_choice_deterministic(digits):
    cfg = tiny_cfg(method="fg-a", model="examples/lr_suite.py:LayerNormMLP", model_options={},
                   lr=recipes.PRIORS["fg-a"], recipe={"entry": "fg-a/*", "overridden": []})
    a, b = (lrfind.find(cfg, digits, grid=(3e-4, 1e-3, 3e-3), steps=6, show_progress=False) for _ in range(2))
    assert a.prior == b.prior and a.prior["lr"] == 1e-3  # 0.2 / sqrt(26,634 parameters) = 1.2e-3, to the grid
    assert a.choice == b.choice and a.record()["val_loss"] == b.record()["val_loss"]


def test_lr_find_offers_no_flag_of_staged_runs(capsys):
    with pytest.raises(SystemExit):
        main(["lr-find", "--help"])
    shown = capsys.readouterr().out
    assert "--microbatches" not in shown and "--pipeline-schedule" not in shown
    assert "--batch-size" in shown
