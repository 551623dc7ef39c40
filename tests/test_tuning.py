"""Honest tuning: the validation split, recipes applied by default, and `bpfree sweep` choosing on validation only.

All on the offline digits data set with tiny models and one or two epochs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bpfree.cli import main
from bpfree.commands.sweep import Point, choose, nothing_chosen
from bpfree.data import TensorData
from bpfree.lab.results import RunResult
from bpfree.training import recipes
from bpfree.training.train import TrainConfig, load_data, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "mlp", "--hidden", "16", "--data", "digits", "--threads", "1"]  # no recipe flags


def numbered(n: int = 100, classes: int = 4) -> TensorData:
    """Training example i is the image filled with i, so every held-out or kept example can be identified."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    y = torch.arange(n) % classes
    return TensorData("numbered", x, y, x[:10], y[:10], classes)


def ids(x: torch.Tensor) -> set[int]:
    return {int(v) for v in x[:, 0, 0, 0]}


def test_hold_out_is_disjoint_fixed_and_keeps_the_training_order():
    data = numbered()
    split = data.hold_out(30)
    val, train = ids(split.val_x), ids(split.train_x)
    assert len(val) == split.num_val == 30 and len(train) == split.num_train == 70
    assert val.isdisjoint(train) and val | train == set(range(100))
    assert split.train_x[:, 0, 0, 0].tolist() == sorted(train)  # the rest keep their order: --train-size is a prefix
    assert torch.equal(split.val_y, split.val_x[:, 0, 0, 0].long() % 4)  # labels travel with their images
    torch.manual_seed(123)  # the global generator does not matter
    assert torch.equal(numbered().hold_out(30).val_x, split.val_x)
    # A subset of the training examples keeps the validation set.
    sub = split.subset(20)
    assert torch.equal(sub.val_x, split.val_x) and ids(sub.train_x) <= train
    assert list(split.val_batches(7))[-1][0].shape[0] == 30 % 7
    with pytest.raises(Exception, match="--val-split must be in 1..99"):
        data.hold_out(100)


def val_digest(cfg: TrainConfig) -> str:
    data = load_data(cfg)
    return hashlib.sha256(data.val_x.numpy().tobytes() + data.val_y.numpy().tobytes()).hexdigest()


def test_split_is_the_same_across_seeds_train_sizes_and_processes():
    base = dict(data="digits", val_split=200)
    digest = val_digest(TrainConfig(**base))
    assert val_digest(TrainConfig(**base, seed=7)) == digest
    assert val_digest(TrainConfig(**base, train_size=100)) == digest
    data = load_data(TrainConfig(**base, train_size=100))
    assert data.num_train == 100 and data.num_val == 200
    assert set(map(bytes, data.val_x.numpy())).isdisjoint(set(map(bytes, data.train_x.numpy())))
    code = ("from bpfree.training.train import TrainConfig; import tests.test_tuning as t; "
            "print(t.val_digest(TrainConfig(data='digits', val_split=200, seed=3)))")
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == digest
    # --classes first: the split is drawn among the examples of those classes.
    subset = load_data(TrainConfig(data="digits", classes=(3, 5), val_split=50, train_size=40))
    assert subset.num_val == 50 and subset.num_train == 40 and set(subset.val_y.tolist()) <= {0, 1}


def test_val_metrics_resume_and_a_changed_split_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "bp", *TINY, "--val-split", "300", "--schedule", "constant", "--out", str(out)]
    assert main([*args, "--epochs", "1", "--lr", "0.1"]) == 0
    assert main([*args, "--epochs", "2", "--lr", "0.1", "--resume"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0 <= r["val_error"] <= 100 and r["val_loss"] > 0 for r in records)
    assert json.loads((out / "config.json").read_text())["val_split"] == 300
    capsys.readouterr()
    assert main(["train", "--method", "bp", *TINY, "--val-split", "200", "--schedule", "constant", "--out", str(out),
                 "--epochs", "3", "--lr", "0.1", "--resume"]) == 2
    assert "--resume with a different val_split" in capsys.readouterr().err


def test_compare_tables_show_validation_and_test(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "bp", *TINY, "--epochs", "1", "--val-split", "300", "--out", str(out),
                 "--no-plots"]) == 0
    assert "val error (%)" in capsys.readouterr().out
    with open(out / "results.csv") as f:
        row = next(csv.DictReader(f))
    run = read_metrics(out / "bp" / "seed-0" / "metrics.jsonl")[-1]
    assert float(row["val_error_mean"]) == run["val_error"] and float(row["test_error_mean"]) == run["test_error"]


def test_no_recipe_flags_get_the_recipe_and_a_flag_overrides_it(tmp_path):
    recipe = recipes.lookup("bp", "mlp")
    assert recipe.validated, "bp on mlp should carry a validated recipe (docs/tuning.md)"
    assert main(["train", "--method", "bp", *TINY, "--epochs", "1", "--out", str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert {k: config[k] for k in recipes.RECIPE_FIELDS} == recipe.settings
    assert config["recipe"]["entry"] == "bp/mlp" and config["recipe"]["validated"] is True
    assert config["recipe"]["source"] == recipe.source and config["recipe"]["overridden"] == []
    lr = recipe.settings["lr"] * 0.5
    assert main(["train", "--method", "bp", *TINY, "--epochs", "1", "--lr", str(lr), "--out", str(tmp_path / "b")]) == 0
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["lr"] == lr and config["recipe"]["overridden"] == ["lr"]
    assert {k: config[k] for k in recipes.RECIPE_FIELDS if k != "lr"} == \
        {k: v for k, v in recipe.settings.items() if k != "lr"}


def test_recipe_lookup_falls_back_and_every_entry_says_where_it_comes_from():
    assert recipes.lookup("lg-fg-a", "localmixer-s1-1").key == ("lg-fg-a", "localmixer-s1-1")  # its own entry
    assert recipes.lookup("lg-fg-a", "localmixer-m8-16").key == ("lg-fg-a", "localmixer")  # the family's
    assert recipes.lookup("bp", "mobilenetv3-small").key == ("bp", "*")  # every rule: --lr auto on unseen models
    assert recipes.lookup("no-such-rule", "mlp") is recipes.FALLBACK
    for recipe in recipes.entries().values():
        assert set(recipe.settings) == set(recipes.RECIPE_FIELDS)
        assert recipe.source.startswith("validated: bpfree sweep") == recipe.validated
        assert recipe.validated or recipe.source.startswith(("carried over", "auto: "))


def test_compare_takes_per_method_recipe_settings(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"methods": ["bp", "fg-a"], "optimizer": {"bp": "adam", "fg-a": "sgd"},
                                  "lr": {"bp": 0.002, "fg-a": 0.01}, "epochs": 1}))
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(config), *TINY, "--momentum", "fg-a=0.5", "--out", str(out),
                 "--no-plots"]) == 0
    bp = json.loads((out / "bp" / "seed-0" / "config.json").read_text())
    fga = json.loads((out / "fg-a" / "seed-0" / "config.json").read_text())
    assert (bp["optimizer"], bp["lr"], fga["optimizer"], fga["lr"], fga["momentum"]) == ("adam", 0.002, "sgd", 0.01,
                                                                                          0.5)
    assert bp["momentum"] == recipes.lookup("bp", "mlp").settings["momentum"]  # not given for bp: its recipe's
    assert main(["compare", "--methods", "bp", *TINY, "--lr", "0.1,0.2", "--out", str(out)]) == 2


def fake_point(label: str, val: float, val_loss: float, test: float) -> Point:
    record = {"epoch": 1, "val_error": val, "val_loss": val_loss, "test_error": test, "train_error": 0.0}
    return Point("m", label, [RunResult(Path(label), {"epochs": 1}, [record])])


def test_choose_reads_validation_only():
    points = [fake_point("a", 5.0, 0.3, 1.0), fake_point("b", 4.0, 0.4, 9.0), fake_point("c", 4.0, 0.2, 50.0)]
    assert choose(points).label == "c"  # lowest val error; tie broken by val loss; test error ignored
    assert choose(points[:2]).label == "b"


def test_sweep_chooses_by_validation_even_where_test_disagrees(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--methods", "bp", *TINY, "--epochs", "1", "--optimizer", "sgd", "--lr", "0.05,0.2",
            "--val-split", "300", "--out", str(out), "--no-plots"]
    assert main(args) == 0
    folders = {lr: out / "bp" / f"optimizer=sgd,lr={lr}" / "seed-0" for lr in ("0.05", "0.2")}
    # Rewrite the finished runs' numbers: lr 0.05 is best on validation, lr 0.2 on test by far.
    for lr, (val, test) in {"0.05": (10.0, 90.0), "0.2": (20.0, 1.0)}.items():
        path = folders[lr] / "metrics.jsonl"
        record = read_metrics(path)[-1] | {"val_error": val, "test_error": test}
        path.write_text(json.dumps(record) + "\n")
    capsys.readouterr()
    assert main(args) == 0  # every run finished: skipped, nothing retrained
    printed = capsys.readouterr()
    assert printed.err.count("finished before, skipped") == 2
    chosen = [line for line in printed.out.splitlines() if "✓" in line]
    assert len(chosen) == 1 and "lr 0.05" in chosen[0]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["lr"] == {"bp": 0.05} and recipe["optimizer"] == {"bp": "sgd"} and recipe["val_split"] == 300
    assert "| 90.00 |" in printed.out  # the chosen recipe's test error, reported once
    # The written recipe reruns as a comparison.
    assert main(["compare", "--config", str(out / "recipe.json"), "--threads", "1", "--no-plots"]) == 0
    assert json.loads((out / "compare" / "bp" / "seed-0" / "config.json").read_text())["lr"] == 0.05


def test_sweep_where_every_grid_point_diverges_says_so(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--methods", "bp", *TINY, "--epochs", "1", "--optimizer", "sgd", "--lr", "1e30,1e35",
            "--val-split", "300", "--out", str(out), "--no-plots"]
    assert main(args) == 1  # as compare: the report was written, but runs did not finish
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("bpfree: bp: no grid point finished with every seed (diverged at epoch "
                                            "1), so nothing was chosen; none trained: try lower learning rates (--lr)")
    report = (out / "sweep.md").read_text()
    assert "none trained" in report and "no recipe.json was written" in report
    assert not (out / "recipe.json").exists()


def test_sweep_names_the_best_point_that_trained_some_seeds():
    trained = fake_point("lr=0.1", 12.0, 0.5, 10.0)
    trained.runs.append(RunResult(Path("x"), {"epochs": 1}, [], failure="diverged"))
    line = nothing_chosen("m", [trained])
    assert "the best that did train: lr=0.1 (1 of 2 seeds, val error 12.00 %)" in line


def test_sweep_needs_a_validation_split(tmp_path, capsys):
    assert main(["sweep", "--methods", "bp", *TINY, "--val-split", "0", "--out", str(tmp_path)]) == 2
    assert "--val-split must be at least 1" in capsys.readouterr().err
