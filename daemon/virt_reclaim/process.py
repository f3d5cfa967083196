"""The one place that runs subprocesses: argv lists only, always a timeout, kill on expiry."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

# Bound what is kept of a tool's output (and later logged).
MAX_OUTPUT_BYTES = 16 * 1024 * 1024


class CommandError(Exception):
    """A command could not be run, failed, or timed out."""

    def __init__(self, argv: Sequence[str], message: str, stderr: str = "") -> None:
        self.argv = tuple(argv)
        self.stderr = stderr
        detail = f": {stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"{argv[0]}: {message}{detail}")


class CommandTimeout(CommandError):
    """The command ran longer than its timeout and was killed."""


@dataclass(frozen=True)
class Completed:
    """The result of a command that ran to its end."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    ok_codes: Sequence[int] = (0,),
) -> Completed:
    """Run ``argv`` without a shell and return its output.

    The command runs in its own process group so that a timeout kills it and
    every child it started.

    Args:
        argv: The program and its arguments.
        timeout: Seconds the command may run before it is killed.
        check: Raise CommandError when the exit status is not in ``ok_codes``.
        ok_codes: Exit statuses that count as success.

    Returns:
        The exit status and the decoded output.

    Raises:
        CommandTimeout: The command did not finish within ``timeout``.
        CommandError: The program is missing, or it failed and ``check`` is set.
    """
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise CommandError(argv, f"cannot be started ({exc.strerror})") from exc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise CommandTimeout(argv, f"killed after {timeout:g} s timeout", _decode(err)) from None
    except BaseException:
        # KeyboardInterrupt or similar: never leave the child behind.
        _kill_group(proc)
        proc.wait()
        raise
    result = Completed(tuple(argv), proc.returncode, _decode(out), _decode(err))
    if check and result.returncode not in ok_codes:
        raise CommandError(argv, f"exited with status {result.returncode}", result.stderr)
    return result


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _decode(data: bytes) -> str:
    return data[:MAX_OUTPUT_BYTES].decode("utf-8", errors="replace")
