"""The training engine: bp's gradients, resume equivalence (also after a real kill), divergence, bad input."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bpfree.cli import main
from bpfree.core.errors import DivergedError
from bpfree.lab.results import load_run
from bpfree.training.runfolder import read_metrics
from bpfree.training.train import TrainConfig, load_data, train

ROOT = Path(__file__).resolve().parents[2]
COMPARED = ("epoch", "train_loss", "train_error", "test_error", "test_loss", "lr")


def small_config(out, **kw):
    base = dict(method="bp", model="mlp", data="digits", epochs=3, batch_size=64, lr=0.05,
                model_options={"hidden": (32,)}, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def same_metrics(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in COMPARED} == {k: rb[k] for k in COMPARED}


def test_training_learns_and_writes_files(tmp_path, digits):
    records = train(small_config(tmp_path / "run", epochs=4), data=digits)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["test_error"] < 15.0
    for name in ("metrics.jsonl", "config.json", "checkpoint.pt"):
        assert (tmp_path / "run" / name).exists()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method"] == "bp" and config["model_options"] == {"hidden": [32]}


class Interrupting:
    """Wraps a data set and raises KeyboardInterrupt after `after` training batches (a Ctrl-C mid-epoch)."""

    def __init__(self, data, after):
        self.data, self.left = data, after

    def __getattr__(self, name):
        return getattr(self.data, name)

    def train_batches(self, *args, **kw):
        for batch in self.data.train_batches(*args, **kw):
            if self.left == 0:
                raise KeyboardInterrupt
            self.left -= 1
            yield batch


def test_resume_equals_uninterrupted(tmp_path, digits):
    full = train(small_config(tmp_path / "full", schedule="cosine", warmup_epochs=1), data=digits)
    cfg = small_config(tmp_path / "part", schedule="cosine", warmup_epochs=1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data=Interrupting(digits, after=2 * 23 + 5))  # 23 batches per epoch: dies inside epoch 3
    assert len(read_metrics(tmp_path / "part" / "metrics.jsonl")) == 2
    cfg.resume = True
    same_metrics(train(cfg, data=digits), full)


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path, digits):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BPFREE_THREADS": "1"}
    args = ["train", "--data", "digits", "--hidden", "32", "--batch-size", "16", "--epochs", "12", "--seed", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "bpfree", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(read_metrics(out / "metrics.jsonl")) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_metrics(out / "metrics.jsonl"))
    assert 3 <= done < 12, "the run should have been killed part-way"
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    same_metrics(read_metrics(out / "metrics.jsonl"), read_metrics(tmp_path / "whole" / "metrics.jsonl"))


def test_torn_metrics_line_is_dropped_on_resume(tmp_path, digits):
    cfg = small_config(tmp_path / "run", epochs=2)
    train(cfg, data=digits)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # a kill in the middle of a write
    cfg.resume, cfg.epochs = True, 3
    records = train(cfg, data=digits)
    assert [r["epoch"] for r in records] == [1, 2, 3]


class Poisoned(Interrupting):
    """Feeds infinite inputs after `after` batches, so the loss turns NaN mid-run."""

    def train_batches(self, *args, **kw):
        for x, y in self.data.train_batches(*args, **kw):
            self.left -= 1
            yield (x * float("inf") if self.left < 0 else x), y


def test_divergence_keeps_last_good_checkpoint(tmp_path, digits):
    cfg = small_config(tmp_path / "run", epochs=3)
    with pytest.raises(DivergedError, match="loss became nan at epoch 2, step 4"):
        train(cfg, data=Poisoned(digits, after=23 + 3))
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    assert [r["epoch"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]
    # The run folder says so: `report` tells a diverged run from an unfinished one.
    assert load_run(tmp_path / "run").status == "diverged at epoch 2"


def test_divergence_exit_code_3(tmp_path, capsys):
    assert main(["train", "--data", "digits", "--lr", "1e12", "--out", str(tmp_path / "r")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss became" in err[0]


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    base = ["train", "--data", "digits", "--hidden", "16", "--epochs", "1", "--out", str(tmp_path / "r")]
    assert main(base) == 0
    assert main([*base, "--resume", "--lr", "0.5"]) == 2
    assert "--resume with a different lr" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "bpp"], "did you mean 'bp'"),
        (["--model", "mpl"], "did you mean 'mlp'"),
        (["--data", "mnits"], "did you mean 'mnist'"),
        (["--lr", "-0.1"], "--lr must be greater than 0"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--momentum", "1.5"], "--momentum"),
        (["--train-size", "0"], "--train-size"),
        (["--hidden", "a,b"], "--hidden: expected tuple"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
        (["--augment"], "--augment is only available for cifar10"),
        (["--threads", "0"], "--threads must be in 1.."),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, capsys, args, message):
    assert main(["train", "--data", "digits", "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    base = ["train", "--data", "digits", "--hidden", "16", "--epochs", "1", "--out", str(tmp_path / "r")]
    assert main(base) == 0
    metrics = (tmp_path / "r" / "metrics.jsonl").read_bytes()
    assert main(base) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "r" / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.slow
def test_cli_subprocess_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bpfree", "train", "--method", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_listings(capsys):
    assert main(["models"]) == 0
    assert "mlp" in capsys.readouterr().out
    assert main(["methods"]) == 0
    assert "bp" in capsys.readouterr().out


def test_run_saved_before_an_option_existed_still_resumes(tmp_path):
    """A config saved before a method gained an option reads as that option's default (resume, compare, report)."""
    # A constant schedule (not the recipe's cosine), so that the run can be extended.
    base = ["train", "--data", "digits", "--hidden", "16", "--schedule", "constant", "--epochs", "1", "--out",
            str(tmp_path / "r")]
    assert main(base) == 0
    path = tmp_path / "r" / "config.json"
    saved = json.loads(path.read_text())
    assert saved["method_options"]  # bp's options, spelled out
    path.write_text(json.dumps({**saved, "method_options": {}}))
    assert main([*base[:-4], "--epochs", "2", "--out", str(tmp_path / "r"), "--resume"]) == 0
    assert len(read_metrics(tmp_path / "r" / "metrics.jsonl")) == 2
    path.write_text(json.dumps({**saved, "method_options": {"objective": "contrastive"}}))
    assert main([*base[:-4], "--epochs", "3", "--out", str(tmp_path / "r"), "--resume"]) == 2


def val_digest(cfg: TrainConfig) -> str:
    data = load_data(cfg)
    return hashlib.sha256(data.val_x.numpy().tobytes() + data.val_y.numpy().tobytes()).hexdigest()


@pytest.mark.slow
def test_split_is_the_same_across_seeds_train_sizes_and_processes():
    base = dict(data="digits", val_split=200)
    digest = val_digest(TrainConfig(**base))
    assert val_digest(TrainConfig(**base, seed=7)) == digest
    assert val_digest(TrainConfig(**base, train_size=100)) == digest
    data = load_data(TrainConfig(**base, train_size=100))
    assert data.num_train == 100 and data.num_val == 200
    assert set(map(bytes, data.val_x.numpy())).isdisjoint(set(map(bytes, data.train_x.numpy())))
    code = ("from bpfree.training.train import TrainConfig; import tests.training.test_train as t; "
            "print(t.val_digest(TrainConfig(data='digits', val_split=200, seed=3)))")
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == digest
    # --classes first: the split is drawn among the examples of those classes.
    subset = load_data(TrainConfig(data="digits", classes=(3, 5), val_split=50, train_size=40))
    assert subset.num_val == 50 and subset.num_train == 40 and set(subset.val_y.tolist()) <= {0, 1}
