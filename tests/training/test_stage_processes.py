"""`compare --stages S` (training/stage_processes.py): every method that can be staged trains on S processes, the
others in one process with a line saying so; a stage's error comes back as one process's would."""

import json

import pytest

from bpfree.cli import main
from bpfree.core.errors import UsageError
from bpfree.training.stage_processes import train_staged
from bpfree.training.train import TrainConfig


@pytest.mark.slow
def test_compare_stages_runs_what_can_be_staged_on_stages(tmp_path, data_root, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--methods", "bp,l-bp,ff", "--data", "mnist", "--data-root", str(data_root),
                 "--hidden", "16,16", "--epochs", "1", "--train-size", "256", "--stages", "2", "--microbatches", "2",
                 "--out", str(out), "--no-plots", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    config = {m: json.loads((out / m / "seed-0" / "config.json").read_text()) for m in ("bp", "l-bp", "ff")}
    assert config["bp"]["stages"] == 2 and config["bp"]["microbatches"] == 2
    assert config["l-bp"]["stages"] == 2 and config["l-bp"]["microbatches"] is None
    assert config["ff"]["stages"] == 1
    assert "ff trains in one process: --stages: ff cannot be staged" in err


@pytest.mark.slow
def test_a_stage_error_comes_back_as_its_exception(tmp_path, data_root):
    cfg = TrainConfig(method="l-bp", data="mnist", data_root=str(data_root), epochs=1, out=str(tmp_path / "run"),
                      blocks=("no_such_module",), stages=2)
    with pytest.raises(UsageError, match="no_such_module"):
        train_staged(cfg, threads=1)


def test_sweep_refuses_stages(capsys):
    assert main(["sweep", "--methods", "bp", "--stages", "2", "--data", "digits", "--out", "unused"]) == 2
    assert "--stages: sweep trains each grid point in one process" in capsys.readouterr().err
