"""One job per domain: the lock file, held by another process or this one, and freed by death.

Recovery relies on the last: a job whose process is gone has a free lock.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from virt_reclaim.job.lock import DomainBusy, DomainLock

UUID = "6f0c1e8a-0000-4000-8000-000000000001"
HOLD = """
import sys
from virt_reclaim.job.lock import DomainLock
lock = DomainLock(sys.argv[1], sys.argv[2])
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


def holder(state: Path) -> subprocess.Popen[str]:
    """Another process holding the domain's lock until its stdin closes or it is killed."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(state), UUID], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    assert child.stdout is not None
    assert child.stdout.readline() == "held\n"
    return child


def test_the_lock_is_a_private_file_per_domain(tmp_path: Path) -> None:
    with DomainLock(tmp_path / "state", UUID) as lock:
        assert lock.path == tmp_path / "state" / "locks" / f"{UUID}.lock"
        assert lock.path.stat().st_mode & 0o777 == 0o600
        assert lock.path.parent.stat().st_mode & 0o777 == 0o700
        # Another domain's lock is another file: both held at once.
        with DomainLock(tmp_path / "state", UUID.replace("1", "2")):
            pass


def test_a_second_holder_in_this_process_is_refused_until_release(tmp_path: Path) -> None:
    first = DomainLock(tmp_path, UUID)
    first.acquire()
    with pytest.raises(DomainBusy, match=f"another virt-reclaim job holds .*{UUID}.lock"):
        DomainLock(tmp_path, UUID).acquire()
    first.release()
    first.release()  # twice is harmless
    with DomainLock(tmp_path, UUID):
        pass


def test_a_lock_held_by_a_living_process_refuses_and_dies_with_it(tmp_path: Path) -> None:
    child = holder(tmp_path)
    try:
        with pytest.raises(DomainBusy):
            DomainLock(tmp_path, UUID).acquire()
    finally:
        child.kill()
        child.wait(timeout=30)
    # SIGKILL gives the process no chance to unlock: the kernel drops the lock with it.
    with DomainLock(tmp_path, UUID) as lock:
        assert lock.path.exists()


def test_a_refused_acquire_leaves_no_descriptor_open(tmp_path: Path) -> None:
    """A daemon refused again and again during a long job must not run out of descriptors."""
    child = holder(tmp_path)
    try:
        before = len(list(Path("/proc/self/fd").iterdir()))
        for _ in range(50):
            with pytest.raises(DomainBusy):
                DomainLock(tmp_path, UUID).acquire()
        assert len(list(Path("/proc/self/fd").iterdir())) == before
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
