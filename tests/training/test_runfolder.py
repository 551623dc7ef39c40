"""Run folders survive races, kills, signals, damage and full disks; data-parallel launches fail with exit 4.

Every case ends with one line on stderr, the documented exit code (docs/reliability.md) and nothing lost. Kills
and signals are delivered by the process to itself at a chosen point (tests/training/signal_hooks.py), so these
tests are deterministic: no sleeps racing a running epoch.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bpfree.cli import main, out_of_memory
from bpfree.core.errors import DivergedError, Terminated, UsageError
from bpfree.training import runfolder
from bpfree.training.runfolder import LOCK, RunLock, append_line, read_metrics
from bpfree.training.train import TrainConfig, train
from tests.training import signal_hooks

ROOT = Path(__file__).resolve().parents[2]
HOOKS = Path(__file__).with_name("signal_hooks.py")
COMPARED = ("epoch", "train_loss", "train_error", "test_error", "test_loss", "lr")
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

def run_args(data_root: Path, out: Path, epochs: int = 3) -> list[str]:
    return ["train", "--data", "mnist", "--data-root", str(data_root), "--hidden", "16", "--batch-size", "64",
            "--epochs", str(epochs), "--seed", "1", "--threads", "1", "--out", str(out)]


def run_with_hook(where: str, call: int, sig: str, args: list[str]) -> subprocess.CompletedProcess:
    """`bpfree ARGS` in a child that sends itself `sig` during its `call`-th checkpoint or metrics write."""
    return subprocess.run([sys.executable, str(HOOKS), where, str(call), sig, *args], env=ENV, capture_output=True,
                          text=True, timeout=120)


def compared(records: list[dict]) -> list[dict]:
    return [{k: r[k] for k in COMPARED} for r in records]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def whole(data_root, tmp_path_factory) -> list[dict]:
    """The metrics of the uninterrupted 3-epoch run that every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(run_args(data_root, out)) == 0
    return compared(read_metrics(out / "metrics.jsonl"))


def one_line(capsys) -> str:
    """The one line on stderr, besides the per-epoch progress lines."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("epoch ")]
    assert len(err) == 1, err
    return err[0]


def small(out: Path, *extra: str) -> list[str]:
    return ["train", "--data", "digits", "--hidden", "16", "--epochs", "2", "--threads", "1", "--out", str(out),
            *extra]


# -- locking --------------------------------------------------------------------------------------------------------
def test_second_run_on_the_same_folder_fails_at_once_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    with RunLock(out):
        assert main(small(out)) == 2
        line = one_line(capsys)
        assert f"in use by another bpfree process (pid {os.getpid()}:" in line
        assert listing(out) == [LOCK]  # the refused run wrote nothing
    assert listing(out) == []  # released: the lock file goes too
    assert main(small(out)) == 0


def test_lock_is_released_by_the_kernel_when_its_holder_is_killed(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bpfree.training.runfolder import RunLock; "
                               "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)",
                               str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(small(out)) == 2
        assert f"(pid {holder.pid}:" in one_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK).exists()  # a kill -9 leaves the file, but not the lock
    assert main(small(out)) == 0
    assert listing(out) == ["checkpoint.pt", "config.json", "metrics.jsonl"]


def test_a_second_compare_on_the_same_folder_stops_before_training(tmp_path, capsys):
    out = tmp_path / "cmp"
    with RunLock(out, "comparison folder"):
        assert main(["compare", "--methods", "bp", "--data", "digits", "--hidden", "8", "--epochs", "1",
                     "--out", str(out), "--no-plots"]) == 2
        assert "is in use by another bpfree process" in one_line(capsys)
        assert listing(out) == [LOCK]  # no run folder started, none left half-written for a later compare


def test_compare_stops_at_a_run_folder_another_process_is_training_in(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "bp", "--seeds", "0", "--data", "digits", "--hidden", "8", "--epochs", "1",
            "--out", str(out), "--no-plots"]
    run = out / "bp" / "seed-0"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")  # as a run in its first epoch has it
    with RunLock(run):
        assert main(args) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after compare's progress line
        assert last.startswith(f"bpfree: error: {run} is in use by another bpfree process")
        assert listing(run) == [LOCK, "config.json"]  # no failed.json, nothing deleted
    (run / "config.json").unlink()
    assert main(args) == 0


# -- kills: every state a kill can leave resumes to the uninterrupted run -------------------------------------------
def test_kill_during_the_first_checkpoint_write_resumes(data_root, whole, tmp_path, capsys):
    out = tmp_path / "run"
    killed = run_with_hook("checkpoint", 1, "SIGKILL", run_args(data_root, out))
    assert killed.returncode == -signal.SIGKILL
    left = listing(out)
    assert "checkpoint.pt" not in left and "metrics.jsonl" not in left
    assert any(n.startswith(".checkpoint.pt.tmp") for n in left)  # the torn temp file
    assert main([*run_args(data_root, out), "--resume"]) == 0
    assert "starting the run from epoch 1" in capsys.readouterr().err
    assert listing(out) == ["checkpoint.pt", "config.json", "metrics.jsonl"]  # temp file and lock file gone
    assert compared(read_metrics(out / "metrics.jsonl")) == whole


def test_kill_mid_metrics_line_restores_that_epoch_from_the_checkpoint(data_root, whole, tmp_path):
    out = tmp_path / "run"
    killed = run_with_hook("append", 2, "SIGKILL", run_args(data_root, out))
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "metrics.jsonl").read_text().endswith("\n")  # epoch 2's line is torn
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2  # written first
    assert main([*run_args(data_root, out), "--resume"]) == 0
    assert compared(read_metrics(out / "metrics.jsonl")) == whole  # epoch 2 restored, not dropped


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test, also where the suite was started in the background (a shell
    starts background jobs with SIGINT ignored, and Python then keeps it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_during_a_checkpoint_write(data_root, whole, tmp_path, capsys, monkeypatch, python_sigint, sig, code,
                                          word):  # fmt: skip
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", signal_hooks.signalling_save(2, sig))
    assert main(run_args(data_root, out)) == code
    assert one_line(capsys) == f"bpfree: {word}"
    # The write in progress was finished, then the run stopped: lock released, no temp file, epochs 1-2 kept.
    assert listing(out) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    monkeypatch.undo()
    assert main([*run_args(data_root, out), "--resume"]) == 0
    assert compared(read_metrics(out / "metrics.jsonl")) == whole


def test_temp_files_of_interrupted_writes_are_removed_on_start(tmp_path):
    out = tmp_path / "run"
    assert main(small(out)) == 0
    for name in (".checkpoint.pt.tmp4242", ".metrics.jsonl.tmp17", ".config.json.tmp9"):
        (out / name).write_bytes(b"x" * 1000)
    (out / ".notes.tmp1").write_text("not ours")
    assert main([*small(out), "--resume"]) == 0
    assert listing(out) == [".notes.tmp1", "checkpoint.pt", "config.json", "metrics.jsonl"]


@pytest.mark.parametrize("older", ["no records", "estimator state without parts"])
def test_checkpoint_from_an_older_version_is_one_line(tmp_path, capsys, older):
    out = tmp_path / "run"
    assert main(small(out)) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    if older == "no records":
        del state["records"]
    else:
        state["estimator"] = {"generator": state["estimator"]["generator"]}
    torch.save(state, out / "checkpoint.pt")
    assert main([*small(out), "--resume"]) == 2
    assert "made by an older bpfree" in one_line(capsys)
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]  # nothing on disk was changed


# -- --resume: a run to continue, and the same run ------------------------------------------------------------------
def test_resume_without_a_run_is_an_error(tmp_path, capsys):
    missing = tmp_path / "nothing"
    assert main([*small(missing), "--resume"]) == 2
    assert f"--resume: {missing} does not exist" in one_line(capsys)
    assert not missing.exists()
    missing.mkdir()
    assert main([*small(missing), "--resume"]) == 2
    assert "holds no run" in one_line(capsys)


def test_resume_from_scratch_is_allowed_where_torchrun_restarts_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")  # the same command line starts the run and resumes it
    assert main([*small(tmp_path / "run"), "--resume"]) == 0


def test_extending_a_constant_schedule_equals_the_longer_run(tmp_path, capsys):
    warm = ["--schedule", "constant", "--warmup-epochs", "1"]  # a warm-up is in epochs: the total does not enter
    assert main([*small(tmp_path / "long"), "--epochs", "4", *warm]) == 0
    assert main([*small(tmp_path / "run"), *warm]) == 0
    capsys.readouterr()
    assert main([*small(tmp_path / "run"), "--epochs", "4", *warm, "--resume"]) == 0
    assert "budget changes from 2 to 4 epochs" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 4
    assert compared(read_metrics(tmp_path / "run" / "metrics.jsonl")) == \
        compared(read_metrics(tmp_path / "long" / "metrics.jsonl"))


@pytest.mark.parametrize("schedule, epochs, message", [
    ("cosine", "3", "its cosine schedule depends on that total"),
    ("constant", "1", "has already trained 2 epochs"),
])
def test_a_resume_that_would_change_the_run_is_refused(tmp_path, capsys, schedule, epochs, message):
    out = tmp_path / "run"
    assert main([*small(out), "--schedule", schedule]) == 0
    before = {n: (out / n).read_bytes() for n in ("config.json", "metrics.jsonl", "checkpoint.pt")}
    capsys.readouterr()
    assert main([*small(out), "--schedule", schedule, "--epochs", epochs, "--resume"]) == 2
    assert message in one_line(capsys)
    assert {n: (out / n).read_bytes() for n in before} == before


@pytest.mark.parametrize("key, value, flag", [("lr", 0.5, "0.5"), ("seed", 7, "7")])
def test_a_hand_edited_config_must_agree_with_the_checkpoint(tmp_path, capsys, key, value, flag):
    out = tmp_path / "run"
    assert main([*small(out), "--epochs", "1"]) == 0
    config = json.loads((out / "config.json").read_text())
    config[key] = value
    (out / "config.json").write_text(json.dumps(config))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main([*small(out), f"--{key}", flag, "--resume"]) == 2
    line = one_line(capsys)
    assert f"config.json says {key} = {value!r} but its checkpoint was trained with" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_resume_on_other_ranks_names_nproc(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*small(out), "--epochs", "1"]) == 0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "world_size": 2}))  # as a run with --nproc 2 stores it
    capsys.readouterr()
    assert main([*small(out), "--epochs", "1", "--resume"]) == 2
    assert "--resume with a different --nproc than the run in" in one_line(capsys)


def test_a_lost_config_is_replaced_by_the_checkpoints_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*small(out), "--epochs", "1"]) == 0
    (out / "config.json").unlink()
    capsys.readouterr()
    assert main([*small(out), "--lr", "0.5", "--resume"]) == 2
    assert "--resume with a different lr than the run in" in one_line(capsys)


# -- damaged or unusable run folders: one line, exit 2, nothing changed ---------------------------------------------
DAMAGE = {
    "empty checkpoint": ("checkpoint.pt", b"", "the file is empty"),
    "foreign torch file": ("checkpoint.pt", {"weights": torch.zeros(2)}, "not a bpfree checkpoint (no epoch, model"),
    "a bare tensor": ("checkpoint.pt", torch.zeros(3), "not a bpfree checkpoint"),
    "not a checkpoint": ("checkpoint.pt", b"hello", "not a readable checkpoint"),
    "invalid config": ("config.json", b'{"method": "bp",', "config.json is not valid JSON"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_run_folder_is_one_line(tmp_path, capsys, case):
    name, content, message = DAMAGE[case]
    out = tmp_path / "run"
    assert main(small(out)) == 0
    if isinstance(content, bytes):
        (out / name).write_bytes(content)
    else:
        torch.save(content, out / name)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main([*small(out), "--resume"]) == 2
    assert message in one_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_middle_metrics_line_names_file_and_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(small(out, "--epochs", "3")) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text(lines[0] + '{"epoch": 2, "train_lo\n' + lines[2])
    capsys.readouterr()
    assert main(["report", str(out), "--no-plots"]) == 2
    assert f"{out / 'metrics.jsonl'}, line 2: not a JSON record" in one_line(capsys)
    with pytest.raises(UsageError, match="line 2"):
        read_metrics(out / "metrics.jsonl")
    # A resume rewrites the file from the checkpoint's records: the damage is repaired.
    assert main([*small(out, "--epochs", "3"), "--resume"]) == 0
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def unwritable(folder: Path, monkeypatch) -> None:
    """A read-only run folder (as root, which may write anyway, the file system's refusal is simulated)."""
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = os.open

        def refuse(path, flags, *args, **kwargs):
            if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, flags, *args, **kwargs)

        monkeypatch.setattr(runfolder.os, "open", refuse)


@pytest.mark.parametrize("case", ["read-only folder", "a file", "name too long"])
def test_unusable_out_is_one_line(tmp_path, capsys, monkeypatch, case):
    out = tmp_path / "run"
    if case == "read-only folder":
        unwritable(out, monkeypatch)
        message = "Permission denied"
    elif case == "a file":
        out.write_text("not a folder")
        message = "is a file, not a folder"
    else:
        out = tmp_path / ("x" * 300)
        message = "File name too long"
    try:
        assert main(small(out)) == 2
        assert message in one_line(capsys)
    finally:
        if case == "read-only folder":
            out.chmod(0o755)


def test_disk_full_during_a_checkpoint_keeps_the_last_one(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 2: some bytes reach the temp file, then the disk is full
            f.write(b"PK\x03\x04")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main(small(out, "--epochs", "3")) == 2
    line = one_line(capsys)
    assert "cannot save epoch 2: No space left on device" in line and "--resume" in line
    assert listing(out) == ["checkpoint.pt", "config.json", "metrics.jsonl"]  # no temp file, lock released
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    monkeypatch.setattr(torch, "save", real_save)
    assert main([*small(out, "--epochs", "3"), "--resume"]) == 0
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


@pytest.fixture
def small_filesystem(tmp_path):
    """A 2 MiB tmpfs of its own (root only: mounting needs CAP_SYS_ADMIN), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_real_full_disk_with_a_checkpoint_bigger_than_the_free_space(small_filesystem, capsys):
    out = small_filesystem / "run"
    constant = ("--schedule", "constant")  # so that --resume may add an epoch
    args = small(out, "--hidden", "256", "--epochs", "1", *constant)  # a checkpoint of a few hundred KiB
    assert main(args) == 0
    size = (out / "checkpoint.pt").stat().st_size
    # Leave free half of what the next checkpoint needs: torch's zip writer then fails part-way.
    free = os.statvfs(small_filesystem).f_bavail * os.statvfs(small_filesystem).f_frsize
    (small_filesystem / "filler").write_bytes(b"\0" * max(0, free - size // 2))
    before = {n: (out / n).read_bytes() for n in ("checkpoint.pt", "metrics.jsonl")}
    capsys.readouterr()
    assert main([*small(out, "--hidden", "256", "--epochs", "2", *constant), "--resume"]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after the note that the budget grows from 1 to 2 epochs
    assert "Traceback" not in err
    assert line.startswith("bpfree: error: cannot save epoch 2: No space left on device"), line
    assert "free space, then --resume" in line
    assert {n: (out / n).read_bytes() for n in before} == before  # the old checkpoint and metrics intact
    assert listing(out) == ["checkpoint.pt", "config.json", "metrics.jsonl"]  # no temp file left
    (small_filesystem / "filler").unlink()
    assert main([*small(out, "--hidden", "256", "--epochs", "2", *constant), "--resume"]) == 0
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_disk_full_during_a_metrics_line_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_line(path, {"epoch": 1})
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        append_line(path, {"epoch": 2, "train_loss": 0.5})
    assert path.read_bytes() == before


# -- out of memory, divergence, bad numbers -------------------------------------------------------------------------
def test_out_of_memory_says_how_much_was_asked_for(tmp_path, capsys):
    # 10^12 x 64 float32 weights: 233 TiB, beyond any address space, so the allocator refuses at once.
    assert main(["train", "--data", "digits", "--hidden", "1000000000000", "--out", str(tmp_path / "r")]) == 2
    assert one_line(capsys).startswith("bpfree: error: out of memory: tried to allocate 232.83 TiB")
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 8 GiB")
    assert out_of_memory(cuda).startswith("out of memory: tried to allocate 1.50 GiB")
    assert out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_out_of_memory_inside_a_step_is_one_line(tmp_path, capsys, monkeypatch):
    from bpfree.methods.bp import Backprop

    def step(self, x, y):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(Backprop, "step", step)
    assert main(small(tmp_path / "r")) == 2
    assert "out of memory: tried to allocate 37.25 GiB" in one_line(capsys)


def test_ff_non_finite_goodness_is_a_divergence(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--method", "ff", "--model", "ff-mlp", "--hidden", "64,64", "--data", "digits",
                 "--lr", "1e6", "--epochs", "1", "--out", str(out)]) == 3
    assert "diverged" in one_line(capsys)
    assert json.loads((out / "failed.json").read_text())["kind"] == "diverged"


class PoisonAfter:
    """Digits whose inputs become infinite after `after` training batches: the loss turns NaN there."""

    def __init__(self, data, after: int):
        self.data, self.after = data, after

    def __getattr__(self, name):
        return getattr(self.data, name)

    def train_batches(self, *args, **kwargs):
        for x, y in self.data.train_batches(*args, **kwargs):
            self.after -= 1
            yield (x * float("inf") if self.after < 0 else x), y


@pytest.mark.parametrize("after, says", [(3, "no checkpoint was written"),
                                         (23 + 3, "the checkpoint of epoch 1 is kept")])  # 23 batches per epoch
def test_divergence_says_whether_a_checkpoint_is_kept(tmp_path, digits, after, says):
    cfg = TrainConfig(data="digits", epochs=2, batch_size=64, model_options={"hidden": (16,)},
                      out=str(tmp_path / "r"))
    with pytest.raises(DivergedError, match=says):
        train(cfg, data=PoisonAfter(digits, after))


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "1e300"])
def test_dist_timeout_must_be_finite(tmp_path, capsys, value):
    for nproc in ("1", "2"):  # also refused before launching ranks
        assert main([*small(tmp_path / "r"), "--dist-timeout", value, "--nproc", nproc]) == 2
        assert "--dist-timeout must be a number of seconds" in one_line(capsys)


# -- data-parallel launches (`train --nproc 2`) -----------------------------------------------------------------------
def rank_pids(launcher: int) -> dict[int, int]:
    """The launcher's worker processes by RANK (Linux /proc)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"\nPPid:\t{launcher}\n" in status:
            rank = [e[5:] for e in environ if e.startswith(b"RANK=")]
            if rank:
                ranks[int(rank[0])] = int(entry.name)
    return ranks


def launch_and_wait_for_epoch(data_root: Path, out: Path, timeout: float) -> subprocess.Popen:
    args = [*run_args(data_root, out, epochs=100000), "--nproc", "2", "--dist-timeout", str(timeout)]
    launcher = subprocess.Popen([sys.executable, "-m", "bpfree", *args], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while not read_metrics(out / "metrics.jsonl") and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.05)
    assert launcher.poll() is None, launcher.communicate()[1]
    return launcher


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_launcher_exits_4_when_a_rank_is_killed_by_a_signal(data_root, tmp_path):
    launcher = launch_and_wait_for_epoch(data_root, tmp_path / "run", timeout=30)
    os.kill(rank_pids(launcher.pid)[1], signal.SIGKILL)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 4, err
    lines = [line for line in err.splitlines() if not line.startswith("epoch ")]
    assert lines[-1].startswith("bpfree: distributed: the data-parallel run failed: ")
    assert "rank 1 was killed by signal 9 (SIGKILL)" in lines[-1]
    assert "Traceback" not in err and not any(line.startswith(("W", "E", "I")) for line in lines)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_launcher_stops_within_seconds_of_the_timeout_when_a_rank_hangs(data_root, tmp_path):
    timeout = 3
    launcher = launch_and_wait_for_epoch(data_root, tmp_path / "run", timeout=timeout)
    hung = rank_pids(launcher.pid)[1]
    os.kill(hung, signal.SIGSTOP)  # alive but silent: only --dist-timeout can tell
    stopped = time.time()
    try:
        _, err = launcher.communicate(timeout=60)
    finally:
        try:
            os.kill(hung, signal.SIGKILL)
        except ProcessLookupError:
            pass
    took = time.time() - stopped
    assert launcher.returncode == 4, err
    assert "did not answer within --dist-timeout 3 s" in err and "Traceback" not in err
    assert took < timeout + 8, took  # rank 0 gives up after the timeout; the launcher kills the stopped rank 2 s later


@pytest.mark.parametrize("raised, code, line", [(KeyboardInterrupt, 130, "bpfree: interrupted"),
                                                (Terminated, 143, "bpfree: terminated")])
def test_a_signal_while_starting_up_is_one_line(monkeypatch, capsys, raised, code, line):
    """Building the parser imports torch (seconds): SIGINT / SIGTERM there end like anywhere else."""
    from bpfree import cli

    def importing_torch():
        raise raised

    monkeypatch.setattr(cli, "make_parser", importing_torch)
    assert main(["train"]) == code
    assert capsys.readouterr().err.strip() == line


@pytest.mark.parametrize("sig, code, line", [("SIGINT", 130, "bpfree: interrupted"),
                                             ("SIGTERM", 143, "bpfree: terminated")])
def test_signal_handlers_are_in_place_before_torch_is_imported(sig, code, line):
    """A child that signals itself just before the subcommands (and torch) are imported; the signal then ends it
    at once with its line, never inside an import (where an exception was swallowed or left a half-done module)."""
    script = ("import os, signal, sys\n"
              "from bpfree import cli\n"
              "real = cli.make_parser\n"
              "def parser():\n"
              f"    os.kill(os.getpid(), signal.{sig})\n"
              "    return real()\n"
              "cli.make_parser = parser\n"
              "sys.exit(cli.main(['models']))\n")
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    assert (done.returncode, done.stderr.strip()) == (code, line)
