"""`bpfree compare` and `bpfree report` end to end on digits with tiny models (one or a few epochs)."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bpfree import methods
from bpfree.cli import main
from bpfree.core.errors import UsageError
from bpfree.training.runfolder import read_metrics
from tests import compare_helpers

SLOW = compare_helpers.NAME
ROOT = Path(__file__).resolve().parents[2]
# The recipe settings spelled out: these tests are about compare, not about each method's recipe.
TINY = ["--data", "digits", "--train-size", "320", "--hidden", "16", "--batch-size", "64", "--optimizer", "sgd",
        "--lr", "0.05", "--momentum", "0.9", "--schedule", "constant"]


@pytest.fixture(autouse=True)
def second_method(monkeypatch):
    compare_helpers.register()
    monkeypatch.setattr(compare_helpers.SlowBackprop, "delay", 0.0)
    yield
    compare_helpers.unregister()


def compare(out: Path, *extra: str, plots: bool = False) -> int:
    return main(["compare", "--methods", f"bp,{SLOW}", *TINY, "--out", str(out), *extra]
                + ([] if plots else ["--no-plots"]))


def csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {row["label"]: row for row in csv.DictReader(f)}


def metrics(out: Path, method: str, seed: int) -> list[dict]:
    return read_metrics(out / method / f"seed-{seed}" / "metrics.jsonl")


def numbers(records: list[dict]) -> list[dict]:
    """Everything a run computes (not its timings and memory, which vary between runs)."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "peak_memory_mb")} for r in records]


@pytest.mark.slow
def test_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare(out, "--epochs", "1", "--seeds", "0,1", "--lr", f"bp=0.1,{SLOW}=0.05", "--tangents", "3",
                   plots=True) == 0
    printed = capsys.readouterr().out
    for name in ("results.md", "results.csv", "test_error.png", "final_error.png"):
        assert (out / name).stat().st_size > 0, name
    for png in ("test_error.png", "final_error.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = csv_rows(out / "results.csv")
    assert list(rows) == ["bp", SLOW]
    md = (out / "results.md").read_text()
    for method in ("bp", SLOW):
        runs = [metrics(out, method, s) for s in (0, 1)]
        assert all(len(r) == 1 for r in runs)
        test = [r[-1]["test_error"] for r in runs]
        train = [r[-1]["train_error"] for r in runs]
        row = rows[method]
        # The CSV holds the runs' own numbers at full precision.
        assert float(row["test_error_mean"]) == statistics.fmean(test)
        assert float(row["test_error_std"]) == statistics.stdev(test)
        assert float(row["train_error_mean"]) == statistics.fmean(train)
        assert float(row["seconds_per_epoch"]) == statistics.fmean(r[0]["seconds"] for r in runs)
        assert row["status"] == "ok" and row["seeds"] == "0 1"
        cell = (f"{statistics.fmean(test):.2f} ± {statistics.stdev(test):.2f} / "
                f"{statistics.fmean(train):.2f} ± {statistics.stdev(train):.2f}")
        assert f"| {method} | 2 | 1 | {cell} |" in md
        assert f"| {method} | 2 | 1 | {cell} |" in printed
    assert float(rows["bp"]["time_vs_bp"]) == 1.0
    ratio = float(rows[SLOW]["seconds_per_epoch"]) / float(rows["bp"]["seconds_per_epoch"])
    assert float(rows[SLOW]["time_vs_bp"]) == pytest.approx(ratio)
    # Per-method lr; --tangents reaches only the method that declares it.
    bp_cfg = json.loads((out / "bp/seed-0/config.json").read_text())
    slow_cfg = json.loads((out / f"{SLOW}/seed-1/config.json").read_text())
    assert (bp_cfg["lr"], bp_cfg["seed"]) == (0.1, 0) and "tangents" not in bp_cfg["method_options"]
    assert (slow_cfg["lr"], slow_cfg["method_options"], slow_cfg["seed"]) == (0.05, {"tangents": 3}, 1)
    assert bp_cfg["model_options"] == slow_cfg["model_options"] == {"hidden": [16]}

    # `bpfree report` on the compare folder rebuilds the same table from the run folders.
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep/results.csv").read_text() == (out / "results.csv").read_text()
    assert (tmp_path / "rep/test_error.png").exists() and (tmp_path / "rep/final_error.png").exists()
    # Rerunning the finished comparison trains nothing and gives the same table.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("checkpoint.pt")}
    assert compare(out, "--epochs", "1", "--seeds", "0,1", "--lr", f"bp=0.1,{SLOW}=0.05", "--tangents", "3") == 0
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("checkpoint.pt")}
    assert csv_rows(out / "results.csv") == rows


def test_method_options_not_given_are_not_an_error(tmp_path):
    # test-slow-bp declares --tangents; comparing bp alone without it must not complain about it.
    assert main(["compare", "--methods", "bp", *TINY, "--epochs", "1", "--no-plots", "--out", str(tmp_path)]) == 0


@pytest.mark.slow
def test_kill_and_rerun_resumes(tmp_path):
    """SIGKILL a real `bpfree compare` process in the middle of its second method; the rerun skips the finished
    run, resumes the killed one, and ends with the numbers of an uninterrupted comparison."""
    args = ["compare", "--methods", f"bp,{SLOW}", *TINY, "--epochs", "3", "--no-plots"]
    killed = tmp_path / "killed"
    code = ("import sys, compare_helpers; compare_helpers.register(); from bpfree.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BPFREE_TEST_DELAY": "0.2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.Popen([sys.executable, "-c", code, *args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(metrics(killed, SLOW, 0)) < 1:  # the slow method has finished its first epoch of three
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "results.md").exists()
    assert 1 <= len(metrics(killed, SLOW, 0)) < 3
    bp_done = (killed / "bp/seed-0/checkpoint.pt").stat().st_mtime_ns
    assert len(metrics(killed, "bp", 0)) == 3

    assert main([*args, "--out", str(killed)]) == 0
    assert (killed / "bp/seed-0/checkpoint.pt").stat().st_mtime_ns == bp_done  # finished run skipped
    whole = tmp_path / "whole"
    assert main([*args, "--out", str(whole)]) == 0
    for method in ("bp", SLOW):
        assert numbers(metrics(killed, method, 0)) == numbers(metrics(whole, method, 0))
        assert len(metrics(killed, method, 0)) == 3
    keep = ("test_error_mean", "train_error_mean", "status")
    assert ({m: {k: r[k] for k in keep} for m, r in csv_rows(killed / "results.csv").items()}
            == {m: {k: r[k] for k in keep} for m, r in csv_rows(whole / "results.csv").items()})


def test_diverging_method_gets_a_row(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare(out, "--epochs", "2", "--lr", f"bp=0.1,{SLOW}=1e20") == 1  # table written, a run diverged
    rows = csv_rows(out / "results.csv")
    assert rows["bp"]["status"] == "ok" and len(metrics(out, "bp", 0)) == 2
    assert rows[SLOW]["status"] == "diverged at epoch 1"
    assert rows[SLOW]["test_error_mean"] == ""
    assert f"| {SLOW} | 1 | 2 | diverged at epoch 1 |" in capsys.readouterr().out
    assert "diverged at epoch 1" in (out / "results.md").read_text()
    # Not retried on a rerun (it would diverge again), and still reported.
    assert compare(out, "--epochs", "2", "--lr", f"bp=0.1,{SLOW}=1e20") == 1  # table written, a run diverged
    assert "not retried" in capsys.readouterr().err
    assert csv_rows(out / "results.csv")[SLOW]["status"] == "diverged at epoch 1"
    # With a sane lr, the failed run is trained afresh (its folder held nothing worth keeping); bp is skipped.
    bp_done = (out / "bp/seed-0/checkpoint.pt").stat().st_mtime_ns
    assert compare(out, "--epochs", "2", "--lr", f"bp=0.1,{SLOW}=0.1") == 0
    assert csv_rows(out / "results.csv")[SLOW]["status"] == "ok"
    assert numbers(metrics(out, SLOW, 0)) == numbers(metrics(out, "bp", 0))  # same rule, same lr, same seed
    assert (out / "bp/seed-0/checkpoint.pt").stat().st_mtime_ns == bp_done


def test_failing_method_gets_a_row(tmp_path, monkeypatch):
    def broken(self, x, y):
        raise RuntimeError("shapes do not match\nmore detail")

    monkeypatch.setattr(compare_helpers.SlowBackprop, "step", broken)
    out = tmp_path / "cmp"
    assert compare(out, "--epochs", "1") == 1  # table written, a run failed
    rows = csv_rows(out / "results.csv")
    assert rows["bp"]["status"] == "ok"
    assert rows[SLOW]["status"] == "RuntimeError: shapes do not match"
    failed = json.loads((out / SLOW / "seed-0/failed.json").read_text())
    assert "Traceback" in failed["detail"]
    # Not a divergence: a rerun tries again (here the method is fixed in between).
    monkeypatch.undo()
    monkeypatch.setattr(compare_helpers.SlowBackprop, "delay", 0.0)
    assert compare(out, "--epochs", "1") == 0
    assert csv_rows(out / "results.csv")[SLOW]["status"] == "ok"


def test_method_refusing_the_setup_stops_before_training(tmp_path, monkeypatch, capsys):
    """A method that cannot handle the model raises UsageError when built: found before bp trains, exit 2."""
    def refuse(self, model, seed=0, **options):
        raise UsageError("test-slow-bp does not support this model")

    monkeypatch.setattr(compare_helpers.SlowBackprop, "__init__", refuse)
    out = tmp_path / "cmp"
    assert compare(out, "--epochs", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test-slow-bp does not support this model" in err[0]
    assert not (out / "bp").exists()


def test_config_file_and_overrides(tmp_path):
    config = tmp_path / "exp.json"
    config.write_text(json.dumps({
        "description": "a test experiment", "methods": ["bp", SLOW], "data": "digits", "hidden": [16, 8],
        "epochs": 3, "seeds": [1], "lr": {"bp": 0.2, SLOW: 0.01}, "batch-size": 64, "train_size": 320,
        "out": str(tmp_path / "fromfile"),
    }))
    # The command line overrides the file (epochs, out); everything else comes from the file.
    out = tmp_path / "cli"
    assert main(["compare", "--config", str(config), "--epochs", "1", "--out", str(out), "--no-plots"]) == 0
    cfg = json.loads((out / SLOW / "seed-1/config.json").read_text())
    assert (cfg["epochs"], cfg["lr"], cfg["batch_size"], cfg["model_options"]) == (1, 0.01, 64, {"hidden": [16, 8]})
    assert not (tmp_path / "fromfile").exists()
    assert (out / "results.md").read_text().startswith("# a test experiment")


@pytest.mark.parametrize("extra, message", [
    (["--tangents", "2", "--methods", "bp"], "none of the compared methods (bp) takes --tangents"),
    (["--tangents", "bp=2"], "method 'bp' does not take --tangents"),
    (["--lr", "fg-zz=0.1"], "--lr names 'fg-zz', which is not among the compared methods"),
    (["--lr", "fast"], "--lr: expected a number"),
    (["--seeds", "0,x"], "--seeds must be integers"),
    (["--methods", "bp,bpp"], "unknown method 'bpp'"),
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, message):
    assert compare(tmp_path / "cmp", "--epochs", "1", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cmp").exists()


def test_bad_config_file(tmp_path, capsys):
    config = tmp_path / "bad.json"
    for content, message in [('{"method": ["bp"]}', "unknown setting 'method'; did you mean 'methods'?"),
                             ('{"epochs": "many"}', "epochs: expected int"),
                             ('{"epochs": 2.5}', "epochs must be a number"),
                             ('{"optimizer": "lbfgs"}', "optimizer: 'lbfgs' is not one of"),
                             ('{"epochs": 1,}', "not valid JSON")]:
        config.write_text(content)
        assert main(["compare", "--config", str(config)]) == 2
        assert message in capsys.readouterr().err


def test_rerun_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare(out, "--epochs", "1") == 0
    capsys.readouterr()
    assert compare(out, "--epochs", "1", "--lr", "0.3") == 2
    assert "holds a run with lr=0.05 (now 0.3)" in capsys.readouterr().err
    # More epochs with a constant schedule extend the runs.
    assert compare(out, "--epochs", "2") == 0
    assert len(metrics(out, "bp", 0)) == 2


def test_shipped_configs_are_valid():
    """Every file in configs/ has only known settings of the right types, and plans into runs when its methods are
    registered (a file naming methods of branches not merged yet is checked for its settings only)."""
    from bpfree.cli import make_parser
    from bpfree.commands.compare import load_config, plan

    files = sorted((ROOT / "configs").glob("*.json"))
    assert files
    for path in files:
        args = make_parser().parse_args(["compare", "--config", str(path)])
        values, description = load_config(str(path), args.compare_actions)
        assert description and values["methods"] and values["out"].startswith("runs/")
        if all(n in methods.METHODS.entries for n in values["methods"].split(",")):
            _, configs, _, _ = plan(args)
            assert len(configs) == len(values["methods"].split(",")) * len(str(values["seeds"]).split(","))


