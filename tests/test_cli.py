"""Bad input and untrusted files through the command line: one line on stderr naming the cause, the documented
exit code, never a traceback (issue 15; docs/reliability.md lists each guarantee with its test here)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bpfree import methods, models
from bpfree.cli import main
from bpfree.data.datasets import MNIST_FILES
from bpfree.data.files import read_cifar_batch
from tests.data.test_files import make_mnist, write_cifar, write_idx

TINY = ["--data", "digits", "--train-size", "64", "--hidden", "8", "--batch-size", "32", "--epochs", "1",
        "--threads", "1"]


def one_line_error(capsys, *needles: str) -> str:
    """The single stderr line, which must name every needle."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def train(tmp_path: Path, *extra: str) -> int:
    return main(["train", *TINY, "--out", str(tmp_path / "run"), *extra])


# -- option values ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", ["-1", "5000000000"])
@pytest.mark.parametrize("command", ["train", "compare", "grad-quality"])
def test_seed_out_of_range(tmp_path, capsys, seed, command):
    if command == "train":
        assert train(tmp_path, "--seed", seed) == 2
    elif command == "compare":
        assert compare(tmp_path, "--seeds", f"0,{seed}") == 2
    else:
        assert grad_quality(tmp_path, "--seed", seed) == 2
    one_line_error(capsys, "--seed", "4294967295", seed)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cmp").exists() and not (tmp_path / "gq").exists()


@pytest.mark.parametrize("model, option, value", [
    ("mlp", "--hidden", "-5"), ("mlp", "--hidden", "0"), ("mlp", "--hidden", "64,0"),
    ("ff-mlp", "--hidden", ","), ("fc-bn", "--layers", "0"), ("fc-bn", "--width", "-1"),
    ("localmixer-s1-1", "--blocks", "0"), ("localmixer-s1-1", "--grid", "0"),
    ("localmixer-s1-1", "--channels", "0"), ("localmixer-s1-1", "--groups", "-2"),
    ("localmixer-s1-1", "--head-dim", "-1"), ("resnet18", "--width", "0"),
    ("mobilenetv3-small", "--width", "0"), ("mobilenetv3-small", "--dropout", "1.5"),
    ("ff-mlp", "--label-value", "nan"),
])
def test_model_size_options_are_bounded(tmp_path, capsys, model, option, value):
    args = [a for a in TINY if a not in ("--hidden", "8")]
    assert main(["train", *args, "--model", model, option, value, "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, option)
    assert not (tmp_path / "run").exists()


def test_every_declared_default_is_within_its_bounds():
    for registry in (models.MODELS, methods.METHODS):
        for name in registry.names():
            for key, option in registry.get(name).options.items():
                option.check_bounds(key, option.default)


# -- data files -----------------------------------------------------------------------------------------------------

def test_mnist_labels_file_in_the_images_slot(tmp_path, capsys):
    make_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    shutil.copy(raw / MNIST_FILES[1], raw / MNIST_FILES[0])
    assert train(tmp_path, "--data", "mnist", "--data-root", str(tmp_path)) == 2
    one_line_error(capsys, MNIST_FILES[0], "holds labels", "should hold images")


def test_mnist_label_out_of_range(tmp_path, capsys):
    make_mnist(tmp_path)
    labels = np.full(20, 3)
    labels[5] = 200
    write_idx(tmp_path / "MNIST" / "raw" / MNIST_FILES[1], labels)
    assert train(tmp_path, "--data", "mnist", "--data-root", str(tmp_path)) == 2
    one_line_error(capsys, MNIST_FILES[1], "label 200 is out of range 0..9")


def test_cifar_label_out_of_range(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    batch = {b"data": np.zeros((6, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 10, 4, 5]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    assert train(tmp_path, "--data", "cifar10", "--data-root", str(tmp_path)) == 2
    one_line_error(capsys, "data_batch_2", "label 10 is out of range 0..9")


def test_data_root_naming_a_file(tmp_path, capsys):
    (tmp_path / "data.txt").write_text("not a folder")
    assert train(tmp_path, "--data", "mnist", "--data-root", str(tmp_path / "data.txt")) == 2
    one_line_error(capsys, "--data-root", "data.txt", "is a file, not a folder")


# -- untrusted pickles ----------------------------------------------------------------------------------------------

class RunsCode:
    """What an attacker puts into a pickle: loading it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_cifar_pickle_runs_no_code(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    marker = tmp_path / "marker"
    crafted = {b"data": np.zeros((6, 3072), dtype=np.uint8), b"labels": [0] * 6, b"x": RunsCode(marker)}
    (folder / "data_batch_1").write_bytes(pickle.dumps(crafted, protocol=2))
    assert train(tmp_path, "--data", "cifar10", "--data-root", str(tmp_path)) == 2
    assert not marker.exists()
    one_line_error(capsys, "data_batch_1", "refused to load", "system")


def test_numpy1_cifar_pickles_still_load(tmp_path):
    """Pickles written by numpy 1 (and the original CIFAR-10 files) name numpy.core.multiarray."""
    batch = {b"data": np.arange(2 * 3072, dtype=np.uint64).astype(np.uint8).reshape(2, 3072), b"labels": [3, 7]}
    raw = pickle.dumps(batch, protocol=2)
    if b"numpy._core.multiarray" in raw:
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "b").write_bytes(raw)
    data, labels = read_cifar_batch(tmp_path / "b")
    assert np.array_equal(data.reshape(2, 3072), batch[b"data"]) and labels.tolist() == [3, 7]


REAL_CIFAR = Path(os.environ.get("BPFREE_DATA") or "data") / "cifar-10-batches-py"


@pytest.mark.skipif(not (REAL_CIFAR / "test_batch").exists(), reason="real CIFAR-10 not laid out")
def test_real_cifar_batch_loads_with_the_restricted_unpickler():
    data, labels = read_cifar_batch(REAL_CIFAR / "test_batch")
    assert data.shape == (10000, 3, 32, 32) and sorted(set(labels.tolist())) == list(range(10))


# -- image folders --------------------------------------------------------------------------------------------------

def image_folder(root: Path, train=("cat", "dog"), val=("cat", "dog"), per_class: int = 2) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for c in classes:
            (root / split / c).mkdir()
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    return root


def train_folder(tmp_path: Path, root: Path, *extra: str) -> int:
    return main(["train", "--data", f"imagefolder:{root}", "--hidden", "4", "--epochs", "1", "--batch-size", "4",
                 "--threads", "1", "--out", str(tmp_path / "run"), *extra])


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "empty"])
def test_imagefolder_undecodable_image_stops_with_its_name(tmp_path, capsys, damage):
    root = image_folder(tmp_path / "images")
    bad = root / "train" / "dog" / "1.jpg"
    good = bad.read_bytes()
    bad.write_bytes({"corrupt": b"\xff\xd8 not really a jpeg " * 10, "truncated": good[: len(good) // 2],
                     "empty": b""}[damage])
    assert train_folder(tmp_path, root) == 2
    one_line_error(capsys, "cannot decode image", str(bad), "delete or replace the file")


@pytest.mark.parametrize("val, message", [
    (("cat",), "lacks class folders that train/ has: dog"),
    ((), "no class sub-folders in"),
    (("cat", "dog", "eel"), "has class folders that train/ lacks (the model could never predict them): eel"),
])
def test_imagefolder_val_classes_must_match_train(tmp_path, capsys, val, message):
    root = image_folder(tmp_path / "images", val=val)
    assert train_folder(tmp_path, root) == 2
    one_line_error(capsys, message)


def test_imagefolder_class_without_images(tmp_path, capsys):
    root = image_folder(tmp_path / "images")
    for f in (root / "val" / "dog").iterdir():
        f.unlink()
    assert train_folder(tmp_path, root) == 2
    one_line_error(capsys, "no images", str(root / "val" / "dog"))


def test_imagefolder_unreadable_folder(tmp_path, capsys, monkeypatch):
    """A folder the user may not list (permissions; simulated: the tests may run as root, who reads anything)."""
    root = image_folder(tmp_path / "images")
    listdir = Path.iterdir

    def iterdir(self):
        if self == root / "val" / "dog":
            raise PermissionError(13, "Permission denied", str(self))
        return listdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert train_folder(tmp_path, root) == 2
    one_line_error(capsys, "cannot read image folder", str(root / "val" / "dog"), "Permission denied")


def test_imagefolder_with_classes(tmp_path, capsys):
    root = image_folder(tmp_path / "images", train=("ant", "bee", "cat"), val=("ant", "bee", "cat"))
    assert train_folder(tmp_path, root, "--classes", "2,0") == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["classes"] == [2, 0]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["model"]["3.weight"].shape[0] == 2  # the classifier has two outputs


@pytest.mark.parametrize("data", ["digits", "imagefolder"])
def test_one_class_is_refused(tmp_path, capsys, data):
    if data == "imagefolder":
        root = image_folder(tmp_path / "images")
        assert train_folder(tmp_path, root, "--classes", "1") == 2
    else:
        assert train(tmp_path, "--classes", "3") == 2
    one_line_error(capsys, "--classes needs at least 2")


def test_imagefolder_with_one_class_folder(tmp_path, capsys):
    root = image_folder(tmp_path / "images", train=("cat",), val=("cat",))
    assert train_folder(tmp_path, root) == 2
    one_line_error(capsys, "needs at least two class sub-folders")


# -- compare --------------------------------------------------------------------------------------------------------

def compare(tmp_path: Path, *extra: str) -> int:
    return main(["compare", "--methods", "bp", *TINY, "--no-plots", "--out", str(tmp_path / "cmp"), *extra])


def test_compare_config_is_a_folder(tmp_path, capsys):
    assert compare(tmp_path, "--config", str(tmp_path)) == 2
    one_line_error(capsys, str(tmp_path), "is a folder")


def test_compare_config_not_utf8(tmp_path, capsys):
    (tmp_path / "c.json").write_bytes(b'{"epochs": 1, "description": "\xff\xfe"}')
    assert compare(tmp_path, "--config", str(tmp_path / "c.json")) == 2
    one_line_error(capsys, "c.json", "is not UTF-8")


@pytest.mark.parametrize("inside", [False, True])
def test_compare_out_is_a_file(tmp_path, capsys, inside):
    (tmp_path / "f").write_text("")
    out = tmp_path / "f" / "sub" if inside else tmp_path / "f"
    assert main(["compare", "--methods", "bp", *TINY, "--no-plots", "--out", str(out)]) == 2
    one_line_error(capsys, "--out", str(out), "cannot be a folder")


def test_compare_checks_every_setup_before_training(tmp_path, capsys):
    """l-bp cannot train a one-block mlp: found before bp (first in the list) trains anything."""
    assert compare(tmp_path, "--methods", "bp,l-bp") == 2
    one_line_error(capsys, "l-bp cannot run this setup", "two or more blocks", "nothing was trained")
    assert not (tmp_path / "cmp" / "bp").exists()


def test_compare_applies_classes(tmp_path):
    """compare loads the data once for all runs: --classes must shape it too (it was ignored)."""
    assert compare(tmp_path, "--classes", "3,7") == 0
    state = torch.load(tmp_path / "cmp" / "bp" / "seed-0" / "checkpoint.pt", weights_only=True)
    assert state["model"]["3.weight"].shape[0] == 2


def test_compare_exits_1_when_every_run_failed(tmp_path, capsys):
    assert compare(tmp_path, "--lr", "1e30", "--seeds", "0,1") == 1
    captured = capsys.readouterr()
    assert "2 of 2 runs did not finish" in captured.err.strip().splitlines()[-1]
    assert "diverged" in (tmp_path / "cmp" / "results.md").read_text()


# -- grad-quality ---------------------------------------------------------------------------------------------------

def grad_quality(tmp_path: Path, *extra: str) -> int:
    return main(["grad-quality", "--methods", "fg-w", "--tangents", "1", "--aggregation", "mean", "--batches", "1",
                 "--seeds", "1", "--hidden", "8", "--out", str(tmp_path / "gq"), *extra])


def test_grad_quality_unknown_device(tmp_path, capsys):
    assert grad_quality(tmp_path, "--device", "tpu") == 2
    one_line_error(capsys, "unknown device 'tpu'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_grad_quality_cuda_without_cuda(tmp_path, capsys):
    assert grad_quality(tmp_path, "--device", "cuda") == 2
    one_line_error(capsys, "--device cuda", "CUDA is not available")


def test_grad_quality_out_is_a_file(tmp_path, capsys):
    (tmp_path / "gq").write_text("")
    assert grad_quality(tmp_path) == 2
    one_line_error(capsys, "--out", "gq", "it is a file")


# -- issue 23: bounds by the machine, malformed files, one-line messages --------------------------------------------

def test_threads_are_bounded_by_the_machine(tmp_path, capsys):
    assert main(["train", *TINY[:-2], "--threads", "100000", "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "--threads must be in 1..", "got 100000")
    assert not (tmp_path / "run").exists()


def test_grad_quality_takes_threads(tmp_path, capsys):
    assert grad_quality(tmp_path, "--threads", "100000") == 2
    one_line_error(capsys, "--threads must be in 1..")
    assert grad_quality(tmp_path, "--threads", "1") == 0


def test_nproc_is_bounded_by_the_cores(tmp_path, capsys):
    assert train(tmp_path, "--nproc", "100000") == 2
    one_line_error(capsys, "--nproc 100000: more ranks than the", "CPU cores")
    assert not (tmp_path / "run").exists()


def test_bad_integer_is_one_line_not_the_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--epochs", "two"])
    assert stop.value.code == 2
    one_line_error(capsys, "--epochs: invalid int value: 'two'", "see bpfree train --help")


def test_config_nested_too_deeply_is_one_line(tmp_path, capsys):
    (tmp_path / "deep.json").write_text('{"lr": ' + "[" * 100000 + "]" * 100000 + "}")
    assert compare(tmp_path, "--config", str(tmp_path / "deep.json")) == 2
    one_line_error(capsys, "deep.json", "nested too deeply")


def test_config_classes_may_be_a_list(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"classes": [3, 7]}))
    assert compare(tmp_path, "--config", str(tmp_path / "c.json")) == 0
    state = torch.load(tmp_path / "cmp" / "bp" / "seed-0" / "checkpoint.pt", weights_only=True)
    assert state["model"]["3.weight"].shape[0] == 2


@pytest.fixture
def finished_run(tmp_path) -> Path:
    assert train(tmp_path) == 0
    return tmp_path / "run"


@pytest.mark.parametrize("value, message", [('"abc"', "test_error is 'abc', not a number"), ("NaN", None)])
def test_report_on_metrics_holding_nan_or_strings(finished_run, capsys, value, message):
    path = finished_run / "metrics.jsonl"
    record = json.loads(path.read_text().splitlines()[-1])
    path.write_text(json.dumps(record).replace(f'"test_error": {json.dumps(record["test_error"])}',
                                               f'"test_error": {value}') + "\n")
    capsys.readouterr()
    code = main(["report", str(finished_run)])
    if message:
        assert code == 2
        one_line_error(capsys, "metrics.jsonl, line 1", message)
    else:  # a NaN is a number: the run's row says its error is not finite, the plots leave it out
        assert code == 0
        assert "error not finite at the last epoch" in (finished_run / "results.md").read_text()
        assert (finished_run / "test_error.png").exists()


def test_config_epochs_as_a_string_is_named(finished_run, capsys):
    config = json.loads((finished_run / "config.json").read_text())
    (finished_run / "config.json").write_text(json.dumps({**config, "epochs": "1"}))
    capsys.readouterr()
    assert main(["train", *TINY, "--out", str(finished_run), "--resume"]) == 2
    one_line_error(capsys, "config.json: epochs is '1', not a whole number")


def test_booby_trapped_checkpoint_gives_no_advice_to_run_it(finished_run, capsys, tmp_path):
    marker = tmp_path / "PWNED"

    class Trap:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"epoch": 1, "model": Trap()}, finished_run / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", *TINY, "--out", str(finished_run), "--resume"]) == 2
    line = one_line_error(capsys, "a pickle that could run code, refused unread", "system")
    assert "weights_only" not in line
    assert not marker.exists()


@pytest.mark.parametrize("args,needle", [(["--input-shape", "x"], "--input-shape x"),
                                         (["--num-classes", "0"], "--num-classes must be at least 1")])
def test_models_listing_refuses_bad_shapes_with_one_line(capsys, args, needle):
    assert main(["models", *args]) == 2
    one_line_error(capsys, needle)


def test_a_run_prints_no_torch_internal_log_lines(tmp_path: Path) -> None:
    """torch's C++ log (the profiler's "USDT" lines, the allocator's "[W...] Memory block of unknown size") is
    not part of a run's output: fdfa on the residual CNN triggers both (the second in epoch 2) when let through."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CPP_LOG_LEVEL", "KINETO_LOG_LEVEL")}
    model = str(Path(__file__).parents[1] / "examples" / "residual_cnn.py") + ":ResidualCNN"
    run = subprocess.run([sys.executable, "-m", "bpfree", "train", "--method", "fdfa", "--model", model, "--data",
                          "digits", "--epochs", "2", "--train-size", "256", "--lr", "0.01", "--out",
                          str(tmp_path / "run"), "--threads", "1"], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    noise = [line for line in run.stderr.splitlines() if line.startswith(("[W", "[I", "USDT"))]
    assert noise == [], noise
