"""A user's own model from the command line: --model path/to/file.py:Name (or module:name) and --blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bpfree import methods, models
from bpfree.cli import main
from bpfree.core.errors import UsageError

MODEL_FILE = '''
import torch
from torch import nn


class Net(nn.Module):
    """A small residual CNN, written as a user would."""

    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(self.body(h) + h)
        return self.fc(h.mean((2, 3)))


def make(num_classes):  # a factory taking only some of the arguments
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))


def broken(num_classes, input_shape):
    raise RuntimeError("out of ideas")


def wrong_output(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


NOT_CALLABLE = 3


def exits(num_classes, input_shape):
    import sys
    sys.exit(0)


def frozen(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes)).requires_grad_(False)


class IntegerLogits(nn.Module):
    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1)).round().long()


class FrozenByNoGrad(nn.Module):
    """A pretrained-feature stem kept frozen the PyTorch way: under torch.no_grad() inside forward."""

    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        with torch.no_grad():
            h = self.stem(x)
        return self.fc(h)


class ExitsWhileTraining(nn.Module):
    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        if self.training:
            import sys
            sys.exit(5)
        return self.fc(x.flatten(1))
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "my_net.py"
    path.write_text(MODEL_FILE)
    return path


TRAIN = ["train", "--data", "digits", "--epochs", "1", "--batch-size", "128", "--threads", "1"]


@pytest.mark.parametrize("method", ["bp", "fa", "dfa", "fdfa", "fg-a"])
def test_train_a_model_from_a_file(tmp_path, model_file, capsys, method):
    out = tmp_path / "run"
    # A constant schedule without a warm-up as a share of the run (dfa's default on unseen models), so that --resume
    # may extend the run (unseen models get a cosine one by default), and a given rate: these 4 steps say whether the
    # file's model trains, not how good a rule's prior is at 4 steps.
    fixed = ["--schedule", "constant", "--warmup-fraction", "0", "--lr", "3e-3"]
    assert main([*TRAIN, "--method", method, "--model", f"{model_file}:Net", "--train-size", "512", *fixed,
                 "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == f"{model_file}:Net" and summary["test_error"] < 90  # chance: 90 %
    assert json.loads((out / "config.json").read_text())["model"] == f"{model_file}:Net"
    assert main([*TRAIN, "--method", method, "--model", f"{model_file}:Net", "--train-size", "512", "--epochs", "2",
                 *fixed, "--out", str(out), "--resume"]) == 0  # fmt: skip


def test_factory_with_some_arguments_and_named_blocks(tmp_path, model_file, capsys):
    assert main([*TRAIN, "--method", "dfa", "--model", f"{model_file}:make", "--blocks", "2",
                 "--out", str(tmp_path / "r")]) == 0  # fmt: skip
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["blocks"] == ["2"]


@pytest.mark.slow
def test_compare_and_grad_quality_take_a_user_model(tmp_path, model_file, capsys):
    assert main(["compare", "--methods", "bp,dfa", "--data", "digits", "--epochs", "1", "--train-size", "256",
                 "--threads", "1", "--model", f"{model_file}:Net", "--out", str(tmp_path / "c")]) == 0  # fmt: skip
    assert main(["grad-quality", "--methods", "fa,dfa", "--data", "digits", "--batches", "1", "--model",
                 f"{model_file}:Net", "--out", str(tmp_path / "g")]) == 0  # fmt: skip


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{dir}/nope.py:Net", "no file"),
        ("{file}:Nope", "has no attribute 'Nope'"),
        ("{file}:NOT_CALLABLE", "not a class or function"),
        ("{file}:broken", "broken(num_classes=10, input_shape=(1, 8, 8)) failed: RuntimeError: out of ideas"),
        ("{file}:wrong_output", "expected logits (2, 10)"),
        ("{dir}/bad.py:Net", "importing"),
        ("no_such_package_xyz.models:Net", "no module 'no_such_package_xyz'"),
        ("{file}:", "expected path/to/file.py:Name"),
        ("{file}", "name the class or function in the file too: {file}:Name"),
        ("{file}:exits", "exits(num_classes=10, input_shape=(1, 8, 8)) failed: it called sys.exit(0)"),
        ("{dir}/exit7.py:Net", "importing {dir}/exit7.py failed: it called sys.exit(7)"),
        ("{file}:frozen", "has every parameter frozen (requires_grad=False)"),
        ("{file}:IntegerLogits", "returns torch.int64 logits"),
        ("{file}:ExitsWhileTraining", "user code called sys.exit(5) during the run"),
    ],
)
def test_bad_user_models_are_one_line_errors(tmp_path, model_file, capsys, spec, message):
    (tmp_path / "bad.py").write_text("import not_a_module_anywhere\n")
    (tmp_path / "exit7.py").write_text("raise SystemExit(7)\n")
    message = message.format(dir=tmp_path, file=model_file)
    spec = spec.format(dir=tmp_path, file=model_file)
    assert main([*TRAIN, "--model", spec, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_model_options_do_not_apply_to_a_user_model(tmp_path, model_file, capsys):
    assert main([*TRAIN, "--model", f"{model_file}:Net", "--width", "8", "--out", str(tmp_path / "r")]) == 2
    assert "apply to the registered models only" in capsys.readouterr().err


def test_bad_block_name_is_a_one_line_error(tmp_path, model_file, capsys):
    assert main([*TRAIN, "--method", "dfa", "--model", f"{model_file}:Net", "--blocks", "stem,nope",
                 "--out", str(tmp_path / "r")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no submodule 'nope'" in err[0], err


def test_the_shipped_example_model_trains_from_outside_the_package(tmp_path, capsys):
    """The README's example: examples/residual_cnn.py, a file outside the package."""
    example = Path(__file__).resolve().parents[2] / "examples" / "residual_cnn.py"
    out = tmp_path / "run"
    assert main([*TRAIN, "--method", "dfa", "--model", f"{example}:ResidualCNN", "--train-size", "256",
                 "--out", str(out)]) == 0  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["model"].endswith("residual_cnn.py:ResidualCNN")


def test_compare_setup_check_uses_the_named_blocks(tmp_path, model_file, capsys):
    """`make` has one block of its own, too few for l-bp; --blocks names two, and compare's check must see them."""
    assert main(["compare", "--methods", "l-bp", "--data", "digits", "--epochs", "1", "--train-size", "256",
                 "--threads", "1", "--model", f"{model_file}:make", "--blocks", "1,2",
                 "--out", str(tmp_path / "c")]) == 0  # fmt: skip


@pytest.mark.parametrize("method", ["fg-w", "fg-a"])
def test_forward_mode_refuses_a_model_that_uses_no_grad_inside_forward(tmp_path, model_file, capsys, method):
    assert main([*TRAIN, "--method", method, "--model", f"{model_file}:FrozenByNoGrad",
                 "--out", str(tmp_path / "r")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{method}: the model's forward gives stem.1.weight and 1 more no gradient" in err[0], err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_backprop_still_trains_a_model_that_uses_no_grad_inside_forward(tmp_path, model_file, capsys):
    assert main([*TRAIN, "--method", "bp", "--model", f"{model_file}:FrozenByNoGrad",
                 "--out", str(tmp_path / "r")]) == 0  # fmt: skip


BAD_BLOCKS = {
    "body,stem": "not the order the forward pass runs them; give --blocks stem,body",
    "stem,stem": "--blocks names 'stem' twice",
    "stem,fc": "'fc' holds the readout 'fc'",
    "stem,stem.0": "'stem.0' lies inside 'stem'",
}


@pytest.mark.parametrize("blocks", list(BAD_BLOCKS))
def test_bad_block_lists_are_refused_alike_by_every_rule(model_file, blocks):
    model = models.build(f"{model_file}:Net", 10, (1, 8, 8))
    for method in methods.METHODS.names():
        with pytest.raises(UsageError) as refused:
            methods.build(method, model, blocks=blocks.split(","))
        assert BAD_BLOCKS[blocks] in str(refused.value), (method, str(refused.value))


def test_too_few_named_blocks_says_to_name_more(tmp_path, model_file, capsys):
    assert main([*TRAIN, "--method", "l-bp", "--model", f"{model_file}:Net", "--blocks", "stem",
                 "--out", str(tmp_path / "r")]) == 2  # fmt: skip
    assert "(--blocks named 1; name more)" in capsys.readouterr().err
