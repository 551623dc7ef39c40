"""--warmup-fraction: a linear warm-up over a share of the run's steps, the same share for a run of any length;
checked, recorded, resumed exactly, and used by the learning-rate probe."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from bpfree.cli import main
from bpfree.training import lrfind, recipes
from bpfree.training.runfolder import read_metrics
from bpfree.training.train import TrainConfig, make_schedule, train
from tests.training.test_train import Interrupting, same_metrics, small_config

SMALL = ["train", "--model", "mlp", "--hidden", "16", "--data", "digits", "--batch-size", "64", "--threads", "1",
         "--optimizer", "sgd", "--lr", "0.05"]


def factors(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = make_schedule(cfg, optimizer, steps_per_epoch)
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


@pytest.mark.parametrize("epochs", [4, 20])
def test_the_warm_up_is_the_same_share_of_a_run_of_any_length(epochs):
    cfg = TrainConfig(epochs=epochs, schedule="cosine", warmup_fraction=0.25)
    lrs = factors(cfg, steps_per_epoch=10)
    warm = epochs * 10 // 4
    assert lrs[:warm] == pytest.approx([(s + 1) / warm for s in range(warm)])  # linear up to the full rate
    assert lrs[warm] == pytest.approx(1.0) and lrs[-1] < 0.01  # then cosine down to zero


def test_fraction_and_epochs_add_up():
    both = factors(TrainConfig(epochs=10, warmup_epochs=1, warmup_fraction=0.1), steps_per_epoch=5)
    assert both == pytest.approx(factors(TrainConfig(epochs=10, warmup_epochs=2), steps_per_epoch=5))


@pytest.mark.parametrize("flags, message", [
    (["--warmup-fraction", "1"], "--warmup-fraction"),
    (["--warmup-fraction", "-0.1"], "--warmup-fraction"),
    (["--epochs", "4", "--warmup-epochs", "3", "--warmup-fraction", "0.5"], "longer than the run"),
])
def test_a_warm_up_longer_than_the_run_is_refused(tmp_path, capsys, flags, message):
    assert main([*SMALL, *flags, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_recorded_and_resumed_exactly(tmp_path, digits):
    kw = dict(schedule="cosine", warmup_fraction=0.5)
    full = train(small_config(tmp_path / "full", **kw), data=digits)
    assert json.loads((tmp_path / "full" / "config.json").read_text())["warmup_fraction"] == 0.5
    cfg = small_config(tmp_path / "part", **kw)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data=Interrupting(digits, after=23 + 5))  # 23 batches per epoch: dies in epoch 2, warming up
    assert len(read_metrics(tmp_path / "part" / "metrics.jsonl")) == 1
    cfg.resume = True
    same_metrics(train(cfg, data=digits), full)
    assert full[0]["lr"] < full[1]["lr"]  # the warm-up did reach the run


def test_a_constant_schedule_with_a_fractional_warm_up_cannot_change_its_epochs_on_resume(tmp_path, capsys):
    out = ["--schedule", "constant", "--warmup-fraction", "0.2", "--out", str(tmp_path / "run")]
    assert main([*SMALL, "--epochs", "2", *out]) == 0
    capsys.readouterr()
    assert main([*SMALL, "--epochs", "3", *out, "--resume"]) == 2  # 3 epochs would move the warm-up's end
    assert "depends on that total" in capsys.readouterr().err
    assert main([*SMALL, "--epochs", "2", *out, "--resume"]) == 0  # the same budget: nothing to do, accepted


def test_the_probe_warms_up_over_the_same_share_of_its_steps(digits):
    cfg = TrainConfig(method="bp", model="mlp", data="digits", optimizer="adam", lr=3e-2, batch_size=32, epochs=10,
                      model_options={"hidden": (16,)}, out="unused")
    pdata, _ = lrfind.probe_data(cfg, digits)
    plain = lrfind.train_point(cfg, pdata, 3e-2, 12)
    by_fraction = lrfind.train_point(replace(cfg, warmup_fraction=0.5), pdata, 3e-2, 12)
    by_epochs = lrfind.train_point(replace(cfg, warmup_epochs=5), pdata, 3e-2, 12)  # the same share, in epochs
    assert by_fraction.val_loss == by_epochs.val_loss != plain.val_loss


def test_dfa_on_a_model_without_a_validated_entry_warms_up_by_default(tmp_path):
    assert recipes.apply("dfa", "examples/lr_suite.py:LayerNormMLP", {})[0]["warmup_fraction"] == 0.05
    assert recipes.apply("dfa", "mlp", {})[0]["warmup_fraction"] == 0.0  # a validated entry keeps its own
    assert recipes.apply("bp", "examples/lr_suite.py:LayerNormMLP", {})[0]["warmup_fraction"] == 0.0
    out = tmp_path / "run"
    assert main(["train", "--method", "dfa", "--model", "examples/lr_suite.py:LayerNormMLP", "--data", "digits",
                 "--epochs", "1", "--threads", "1", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["warmup_fraction"] == 0.05 and config["lr_auto"] and "warmup_fraction" not in \
        config["recipe"]["overridden"]
