"""The one place that runs subprocesses: argv lists only, always a timeout, kill on expiry."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from virt_reclaim.errors import VirtReclaimError
from virt_reclaim.units import MIB

# Bound what is kept of a tool's output (and later logged).
MAX_OUTPUT_BYTES = 16 * MIB


class CommandError(VirtReclaimError):
    """A command could not be run, failed, or timed out."""

    def __init__(self, argv: Sequence[str], message: str, stderr: str = "") -> None:
        self.argv = tuple(argv)
        self.stderr = stderr
        detail = f": {stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"{argv[0]}: {message}{detail}")


class CommandTimeout(CommandError):
    """The command ran longer than its timeout and was killed."""


class CommandCancelled(CommandError):
    """The caller's cancel event was set; the command was killed."""


@dataclass(frozen=True)
class Completed:
    """The result of a command that ran to its end."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


ProgressCallback = Callable[[str], None]


@dataclass(frozen=True)
class Priority:
    """CPU and I/O priority for heavy work: a nice level and an ionice class and level."""

    nice: int = 10
    io_class: int = 2  # best-effort; "idle" (3) could starve a rewrite while the guest is down
    io_level: int = 7

    def prefix(self) -> list[str]:
        """The argv that runs a command at this priority."""
        return [
            "nice", "-n", str(self.nice),
            "ionice", "-c", str(self.io_class), "-n", str(self.io_level),
        ]  # fmt: skip


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    ok_codes: Sequence[int] = (0,),
    on_output: ProgressCallback | None = None,
    priority: Priority | None = None,
    cancel: threading.Event | None = None,
    pass_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run ``argv`` without a shell and return its output.

    The command runs in its own process group so that a timeout kills it and
    every child it started.

    Args:
        argv: The program and its arguments.
        timeout: Seconds the command may run before it is killed.
        check: Raise CommandError when the exit status is not in ``ok_codes``.
        ok_codes: Exit statuses that count as success.
        on_output: Called with each piece of stdout as it arrives (for progress).
        priority: Run under ``nice``/``ionice`` at this priority.
        cancel: When set, the command is killed (checked at least every half second).
        pass_fds: Descriptors the command inherits (it opens them as ``/dev/fd/N``).
        env: The command's whole environment; this process's own when None.

    Returns:
        The exit status and the decoded output.

    Raises:
        CommandTimeout: The command did not finish within ``timeout``.
        CommandCancelled: ``cancel`` was set before the command finished.
        CommandError: The program is missing, or it failed and ``check`` is set.
    """
    full = [*(priority.prefix() if priority else []), *argv]
    try:
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
            env=None if env is None else dict(env),
        )
    except OSError as exc:
        raise CommandError(argv, f"cannot be started ({exc.strerror})") from exc
    try:
        out, err, finished = _collect(proc, time.monotonic() + timeout, on_output, cancel)
    except BaseException:
        # KeyboardInterrupt, or an exception from on_output: never leave the child behind.
        _kill_group(proc)
        proc.wait()
        raise
    if not finished:
        _kill_group(proc)
        proc.wait()
        if cancel is not None and cancel.is_set():
            raise CommandCancelled(argv, "cancelled and killed", _decode(err))
        raise CommandTimeout(argv, f"killed after {timeout:g} s timeout", _decode(err))
    result = Completed(tuple(argv), proc.wait(), _decode(out), _decode(err))
    if check and result.returncode not in ok_codes:
        raise CommandError(argv, f"exited with status {result.returncode}", result.stderr)
    return result


def _collect(
    proc: subprocess.Popen[bytes],
    deadline: float,
    on_output: ProgressCallback | None,
    cancel: threading.Event | None,
) -> tuple[bytes, bytes, bool]:
    """Read stdout and stderr until both close, the deadline passes or ``cancel`` is set."""
    if proc.stdout is None or proc.stderr is None:
        raise RuntimeError("Popen was not given pipes")
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    stdout_fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0 or (cancel is not None and cancel.is_set()):
                return bytes(buffers[stdout_fd]), bytes(buffers[proc.stderr.fileno()]), False
            wait = left if cancel is None else min(left, 0.5)
            for key, _ in selector.select(timeout=wait):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                buffer = buffers[key.fd]
                if len(buffer) < MAX_OUTPUT_BYTES:
                    buffer += chunk[: MAX_OUTPUT_BYTES - len(buffer)]
                if key.fd == stdout_fd and on_output is not None:
                    on_output(chunk.decode("utf-8", errors="replace"))
    return bytes(buffers[stdout_fd]), bytes(buffers[proc.stderr.fileno()]), True


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def kill_qemu_img_holding(path: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every qemu-img that holds the file at ``path`` open (a dead job's).

    Found by the open file, not by name: the job hands qemu-img its files as
    ``/dev/fd/N``. Only qemu-img is killed: never QEMU, nor anything else.
    """
    pids = [pid for pid, comm in holders_of(path) if comm.startswith("qemu-img")]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def holders_of(path: str) -> list[tuple[int, str]]:
    """(pid, command name) of every other process that holds the file at ``path`` open.

    The file, not the name: a process that opened the file before it was renamed
    holds it still; one that holds an older file of that name does not count.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return []
    wanted = (st.st_dev, st.st_ino)
    return [(pid, _comm(pid)) for pid in _pids() if wanted in _open_files(pid)]


def any_named(prefixes: tuple[str, ...]) -> bool:
    """Whether a process whose command name starts with one of ``prefixes`` can be seen.

    Under the unit's ProtectProc=invisible, other users' processes (QEMU's) are not.
    """
    return any(_comm(pid).startswith(prefixes) for pid in _pids())


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()
            and int(entry) != os.getpid()]  # fmt: skip


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _open_files(pid: int) -> set[tuple[int, int]]:
    """(device, inode) of every file ``pid`` has open."""
    found: set[tuple[int, int]] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            found.add((st.st_dev, st.st_ino))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b") ", 1)[1][:1] != b"Z"
    except OSError:
        return False
