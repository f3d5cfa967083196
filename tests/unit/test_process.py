"""process.run with real programs: output, failures, timeouts that kill the whole group."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from virt_reclaim import process
from virt_reclaim.image.imagefile import NewImage


def test_output_and_status() -> None:
    result = process.run(["sh", "-c", "echo out; echo err >&2"], timeout=10)
    assert (result.returncode, result.stdout, result.stderr) == (0, "out\n", "err\n")


def test_failure_raises_with_stderr() -> None:
    with pytest.raises(process.CommandError, match="status 3: boom"):
        process.run(["sh", "-c", "echo boom >&2; exit 3"], timeout=10)


def test_failure_can_be_allowed() -> None:
    assert process.run(["false"], timeout=10, check=False).returncode == 1
    assert process.run(["sh", "-c", "exit 1"], timeout=10, ok_codes=(0, 1)).returncode == 1


def test_missing_program() -> None:
    with pytest.raises(process.CommandError, match="cannot be started"):
        process.run(["/nonexistent/program"], timeout=10)


def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(process.CommandTimeout, match="killed after 1 s"):
        process.run(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=1)
    assert time.monotonic() - started < 10
    child = int(pidfile.read_text())
    # The grandchild was killed with its group, not left behind.
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of an orphan reaped by init counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_output_is_streamed_as_it_arrives() -> None:
    pieces: list[str] = []
    process.run(["sh", "-c", "printf 'a\\r'; sleep 0.2; printf 'b\\r'"], timeout=10,
                on_output=pieces.append)  # fmt: skip
    assert "".join(pieces) == "a\rb\r"
    assert len(pieces) == 2


def test_priority_runs_the_command_niced() -> None:
    result = process.run(["sh", "-c", "nice; ionice"], timeout=10,
                         priority=process.Priority(nice=7, io_class=2, io_level=6))  # fmt: skip
    assert result.stdout.split("\n")[:2] == ["7", "best-effort: prio 6"]
    assert result.argv == ("sh", "-c", "nice; ionice")


def test_a_dead_job_s_qemu_img_is_found_by_the_file_it_holds_and_nothing_else_is_killed(
    tmp_path: Path,
) -> None:
    """The job hands qemu-img its file as /dev/fd/N: the command line does not name it."""
    source, temp = tmp_path / "disk.qcow2", tmp_path / ".disk.tmp"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(source), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 32M", str(source)],
                   check=True, capture_output=True)  # fmt: skip
    new = NewImage(str(temp))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", new.fd_path, "64M"],
                   check=True, pass_fds=(new.fd,))  # fmt: skip
    # 32 MiB at 1 MiB/s: it runs until killed.
    slow = subprocess.Popen(
        ["qemu-img", "convert", "-n", "-r", "1M", "-f", "qcow2", "-O", "qcow2", str(source),
         new.fd_path], pass_fds=(new.fd,),
    )  # fmt: skip
    bystander = subprocess.Popen(["sleep", "60"], stdin=open(temp, "rb"))  # noqa: SIM115
    new.close()
    try:
        assert str(temp) not in " ".join(Path(f"/proc/{slow.pid}/cmdline").read_text().split("\0"))
        assert process.kill_qemu_img_holding(str(temp)) == [slow.pid]
        assert slow.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for proc in (slow, bystander):
            proc.kill()
            proc.wait()
            if proc.stdin:
                proc.stdin.close()
    assert process.kill_qemu_img_holding(str(tmp_path / "gone")) == []
