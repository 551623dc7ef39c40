"""Honest tuning: the validation split, recipes applied by default, and `bpfree sweep` choosing on validation only.

All on the offline digits data set with tiny models and one or two epochs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from bpfree.cli import main
from bpfree.commands.sweep import Point, choose, nothing_chosen
from bpfree.lab.results import RunResult
from bpfree.training.runfolder import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "mlp", "--hidden", "16", "--data", "digits", "--threads", "1"]  # no recipe flags


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


def test_a_recipe_with_an_option_the_model_shares_reruns(tmp_path):
    """--groups is both LocalMixer's and the loss grid's: recipe.json leaves the method's default (0, "the model's
    own") out instead of handing it to the model, whose groups must be at least 1; `--methods` may pick a subset."""
    out = tmp_path / "sweep"
    assert main(["sweep", "--methods", "bp,lg-bp,fg-a", "--model", "localmixer-m1-16", "--channels", "32",
                 "--data", "digits", "--train-size", "64", "--val-split", "64", "--epochs", "1", "--lr", "0.01",
                 "--aggregation", "sum", "--threads", "1", "--out", str(out), "--no-plots"]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["groups"] == 16 and recipe["aggregation"] == {"fg-a": "sum"}  # the model's groups
    assert main(["compare", "--config", str(out / "recipe.json"), "--methods", "bp,lg-bp", "--threads", "1",
                 "--no-plots"]) == 0
    ran = json.loads((out / "compare" / "lg-bp" / "seed-0" / "config.json").read_text())
    assert ran["model_options"]["groups"] == 16
