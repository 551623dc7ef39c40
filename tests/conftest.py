import gzip
import os
import struct
from pathlib import Path

import pytest
import torch

# Tests never reach for the network, and stay on one thread each: the CI machine has two cores.
os.environ.setdefault("BPFREE_OFFLINE", "1")
torch.set_num_threads(1)

# A module fixture that starts processes makes each test using it slow (whichever runs first pays for it).
SLOW_FIXTURES = {"two_rank_runs", "staged_runs", "whole"}
# Slow tests in files that other branches are editing; elsewhere a test says @pytest.mark.slow itself.
SLOW_TESTS = {
    "tests/training/test_stages.py::test_killed_stage_stops_the_other_then_resume_continues",
    "tests/training/test_lrfind.py::test_lr_auto_records_the_probe_and_resume_reuses_it",
    "tests/training/test_lrfind.py::test_compare_resolves_lr_auto_per_method",
    "tests/core/test_memory.py::test_cpu_data_parallel_runs_measure_no_step_and_the_report_measures_apart",
    "tests/core/test_memory.py::test_activation_memory_is_flat_in_depth[ff]",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid in SLOW_TESTS or item.nodeid.split("[")[0] in SLOW_TESTS or \
                SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def float64_one_thread():
    """float64 for exactness checks, one thread for tiny tensors, while the module that asks for it runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="module")
def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as [N, 1, 8, 8] images in [0, 1] and labels, in a fixed shuffled order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


@pytest.fixture(scope="module")
def digit_split(digit_images) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`digit_images` as 1,400 training and 397 test examples."""
    x, y = digit_images
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.fixture
def digits():
    from bpfree.data import load

    return load("digits")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The 8x8 digits stored as MNIST IDX files: subprocesses (data-parallel ranks, runs killed on purpose) load
    them without importing scikit-learn (seconds of start-up per process on the two-core test machine)."""
    from bpfree.data import load
    from bpfree.data.datasets import MNIST_FILES

    root = tmp_path_factory.mktemp("data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    digits = load("digits")
    arrays = [digits.train_x[:256], digits.train_y[:256], digits.test_x[:120], digits.test_y[:120]]
    for name, a in zip(MNIST_FILES, arrays):
        if a.dim() > 1:  # back from the normalised floats to bytes
            a = ((a[:, 0] * 0.4 + 0.3) * 255).round().clamp(0, 255)
        a = a.to(torch.uint8).numpy()
        with gzip.open(raw / name, "wb") as f:
            f.write(struct.pack(">I", 2051 if a.ndim == 3 else 2049) + struct.pack(f">{a.ndim}I", *a.shape)
                    + a.tobytes())
    return root
