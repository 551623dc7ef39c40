"""What keeps a run folder whole: one process at a time (a lock), writes that a kill cannot tear, no stray temp files.

- `RunLock`: an exclusive `flock` on `DIR/.bpfree.lock`, held for the run's whole life. The kernel releases it when
  the process ends, however it ends (kill -9 included), so a stale lock never blocks the next run. The file names the
  holder (pid and command line) so that a second process can say who holds it.
- `atomic_write_bytes`: a temp file in the same folder, fsync, rename; a kill leaves the old file or the new one,
  plus at worst a temp file that `remove_temp_files` deletes on the next start.
- `append_line`: one JSON line, in one write; on an error the file is cut back to its old length.
- `read_metrics` / `read_json`: a damaged file becomes one line naming the file (and line), not a traceback.
- `signals_deferred`: SIGINT / SIGTERM wait until a block of writes has finished, then act as they would have.

Nothing here imports torch: the lock is cheap to take from any process.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from bpfree.errors import UsageError

LOCK = ".bpfree.lock"


class FolderInUse(UsageError):
    """Another process holds the folder's lock: nothing of this process may be written into it."""
_TEMP = re.compile(r"\.(.+)\.tmp\d+")  # what atomic_write_bytes leaves behind when killed: .NAME.tmpPID


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message, or its type's name when the message is empty."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__


def describe_load_error(error: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words.

    A pickle that names code (a global such as posix.system) is said to be one; torch's own message goes on to
    advise weights_only=False, which would run that code, so it is not repeated.
    """
    text = str(error)
    if "Weights only load failed" in text:
        named = re.search(r"unsupported (?:GLOBAL|global:?)\s*:?\s*([\w.]+)", text, re.IGNORECASE)
        what = f" ({named.group(1)})" if named else ""
        return (f"it holds objects beyond tensors and plain containers{what}: a pickle that could run code, "
                "refused unread")
    return f"{type(error).__name__}: {first_line(error)[:200]}"


def describe_os_error(error: OSError, path: Path | str | None = None) -> str:
    """`No space left on device: runs/x/checkpoint.pt` (with a hint for the common cases)."""
    where = error.filename if error.filename is not None else path
    text = error.strerror or first_line(error)
    hint = {errno.ENOSPC: " (disk full: nothing already written was changed; free space, then --resume)",
            errno.EDQUOT: " (disk quota exceeded: nothing already written was changed; free space, then --resume)",
            errno.ENAMETOOLONG: " (choose a shorter path)",
            errno.EROFS: " (read-only file system: choose another --out)",
            errno.EACCES: " (no permission: choose another --out)"}.get(error.errno, "")
    return f"{text}: {where}{hint}" if where is not None else f"{text}{hint}"


class RunLock:
    """An exclusive lock on a folder, taken at once or refused with one line naming the process that holds it.

    The lock file is removed on release, while still locked; a process that opened it just before then finds on
    locking that the path now names another file (or none) and tries again, so two processes never both hold it.
    """

    def __init__(self, folder: Path | str, what: str = "run folder"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.what = what
        self.file: IO[bytes] | None = None  # a file object, so that even a forgotten lock is released when collected

    def acquire(self) -> RunLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise UsageError(f"{self.folder} is a file, not a folder: choose another --out") from None
        except NotADirectoryError:
            raise UsageError(f"{self.folder}: a parent of it is a file, not a folder: choose another --out") from None
        except OSError as e:
            raise UsageError(f"cannot create the {self.what}: {describe_os_error(e, self.folder)}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UsageError(f"cannot write to the {self.what}: {describe_os_error(e, self.path)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip()
                os.close(fd)
                raise FolderInUse(f"{self.folder} is in use by another bpfree process "
                                 f"({f'pid {holder}' if holder else 'just starting'}); "
                                 "wait for it to end or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its previous holder removed the file between our open and our lock: take the new one
        self.file = os.fdopen(fd, "r+b", buffering=0)
        self.file.truncate(0)
        command = " ".join(["bpfree", *sys.argv[1:]] if sys.argv[0].endswith(("bpfree", "__main__.py")) else sys.argv)
        self.file.write(f"{os.getpid()}: {command[:200]}".encode(errors="replace"))
        return self

    def release(self) -> None:
        if self.file is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # e.g. the folder became read-only: closing still drops the lock
        self.file.close()
        self.file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_temp_files(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temp files that interrupted atomic writes of these files left in `folder` (call with its lock)."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP.fullmatch(p.name)
        if m and m.group(1) in names:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_bytes(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write via a temp file in the same folder, fsync, then rename: a kill leaves the old file or the new one.

    On any error (disk full, an interrupt) the temp file is removed and the old file is untouched.
    """
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            try:
                write(f)
            except RuntimeError as e:
                raise write_error(e, tmp) from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_error(error: RuntimeError, path: Path) -> BaseException:
    """The OSError behind a writer's RuntimeError, or `error` itself when there is none.

    torch's zip writer turns a failed write of its file object (disk full, quota) into `RuntimeError: [enforce fail
    at inline_container.cc] unexpected pos ...`; the OSError the file raised is the RuntimeError's context. Where a
    writer keeps no context, a folder with no room left is the cause.
    """
    cause = error.__context__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    if isinstance(cause, OSError):
        return cause
    try:
        full = os.statvfs(path.parent).f_bavail == 0
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return error


def append_line(path: Path, record: dict[str, Any]) -> None:
    """One JSON line in a single write; on an error (disk full) the file is cut back to its previous length."""
    with open(path, "a") as f:
        size = f.tell()
        try:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            f.truncate(size)
            raise


def write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace a JSON-lines file by these records, atomically."""
    atomic_write_bytes(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines metrics file; [] if it does not exist.

    A last line without its newline is a write cut short by a kill: it is left out (the run's checkpoint holds that
    record and restores it on resume). Any other line that is not a JSON record is damage: one line naming the line.
    """
    if not path.exists():
        return []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {first_line(e)}") from None
    records = []
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        if not line.endswith("\n") or not line.strip():
            continue  # the torn last line, or an empty one
        try:
            record = parse_json(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}, line {number}: not a JSON record ({e.msg}); fix or delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise UsageError(f"{path}, line {number}: not a metrics record (no epoch); fix or delete that line")
        # Every metric is a number (NaN and inf included: a loss may overflow); anything else is damage.
        wrong = next((k for k, v in record.items() if isinstance(v, bool) or not isinstance(v, (int, float))), None)
        if wrong is not None:
            raise UsageError(f"{path}, line {number}: {wrong} is {record[wrong]!r}, not a number; fix or delete "
                             "that line")
        records.append(record)
    return records


def parse_json(text: str) -> Any:
    """json.loads, with a document nested too deeply for Python's parser (RecursionError) as a JSONDecodeError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or one line saying what is wrong with it."""
    try:
        value = parse_json(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {first_line(e)}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} does not hold a JSON object")
    return value


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM received inside the block act when it ends (a write in progress always completes).

    The handlers in place before the block (Python's KeyboardInterrupt, the command line's SIGTERM handler, or the
    default action) act then, as if the signal had just arrived. Outside the main thread signals cannot be
    handled, so there the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not None and handler is not signal.SIG_IGN:  # None: set outside Python, cannot be restored
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)
