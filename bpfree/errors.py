"""Errors the command line turns into one-line messages and exit codes."""


class UsageError(Exception):
    """Bad input from the user (unknown name, bad number, impossible combination). Exit code 2."""

    exit_code = 2


class DivergedError(Exception):
    """The loss became NaN or infinite. The last good checkpoint is kept. Exit code 3."""

    exit_code = 3


class DistributedError(Exception):
    """A data-parallel rank died or stopped answering within --dist-timeout. Exit code 4."""

    exit_code = 4


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned by the command line into an exception so that a run ends as after Ctrl-C: lock released,
    temp files removed, a write in progress finished. Exit code 143 (128 + SIGTERM)."""
