"""`bpfree report` over run folders (`bpfree.lab.results`): rows by settings, named by what differs."""

from __future__ import annotations

import statistics

from bpfree.cli import main
from bpfree.training.runfolder import read_metrics
from tests.lab.test_compare import SLOW, TINY, csv_rows, second_method  # noqa: F401  (second_method: an autouse fixture)


def test_report_from_single_runs(tmp_path, capsys):
    """`bpfree report` on `bpfree train` folders: seeds of the same settings form one row; one method with two
    settings gets two rows named by what differs; a missing --out with several folders is a usage error."""
    for lr, seed in ((0.05, 0), (0.05, 1), (0.2, 0)):
        out = tmp_path / f"bp-{lr}-{seed}"
        assert main(["train", *TINY, "--epochs", "1", "--lr", str(lr), "--seed", str(seed), "--out", str(out)]) == 0
    capsys.readouterr()
    runs = sorted(str(p) for p in tmp_path.iterdir())
    assert main(["report", *runs]) == 2
    assert main(["report", *runs, "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    rows = csv_rows(tmp_path / "rep/results.csv")
    assert list(rows) == ["bp (lr=0.05)", "bp (lr=0.2)"]
    assert rows["bp (lr=0.05)"]["seeds"] == "0 1" and rows["bp (lr=0.2)"]["seeds"] == "0"
    first = read_metrics(tmp_path / "bp-0.05-0/metrics.jsonl")[-1]["test_error"]
    second = read_metrics(tmp_path / "bp-0.05-1/metrics.jsonl")[-1]["test_error"]
    assert float(rows["bp (lr=0.05)"]["test_error_mean"]) == statistics.fmean([first, second])
    assert not (tmp_path / "rep/test_error.png").exists()


def test_report_names_rows_by_what_differs(tmp_path, capsys):
    """Two compares of the same methods with different method options, reported together."""
    for k in ("1", "4"):
        assert main(["compare", "--methods", SLOW, *TINY, "--epochs", "1", "--tangents", k, "--no-plots",
                     "--out", str(tmp_path / f"k{k}")]) == 0
    assert main(["report", str(tmp_path / "k1"), str(tmp_path / "k4"), "--out", str(tmp_path / "rep"),
                 "--no-plots"]) == 0
    assert list(csv_rows(tmp_path / "rep/results.csv")) == [f"{SLOW} (tangents=1)", f"{SLOW} (tangents=4)"]
