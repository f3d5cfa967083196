"""Recovery of an offline job, through the mode's own recover over real image files.

What recovery may delete is decided by what it observes: a temporary image that a
process still holds locked is left in place, with the reason, and the job stays
unfinished; one that nobody holds is removed and the original is kept.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes import make_image
from virt_reclaim.errors import VirtError
from virt_reclaim.image import guard
from virt_reclaim.job.modes import mode_of, offline
from virt_reclaim.job.ports import DomainPort
from virt_reclaim.job.results import Recovered, RecoveryOutcome
from virt_reclaim.job.settings import JobSettings
from virt_reclaim.journal.records import JournalDisk, JournalJob
from virt_reclaim.journal.store import Journal

HOLD_S = 120


def journaled_rewrite(tmp_path: Path, image: Path, temp: Path) -> JournalJob:
    """A job journaled as killed in its rewrite step, the guest shut down by it."""
    journal = Journal(tmp_path / "state")
    journal.begin_job("j1", "fake", "u1", JobSettings(), mode="offline")
    journal.record_for_recovery("j1", "running", [JournalDisk("vda", str(image), str(temp), None)])
    for step in ("shutdown", "guard", "preflight", "rewrite"):
        journal.enter_step("j1", step)
    [job] = journal.unfinished()
    return job


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A temporary image held open and locked by qemu-io, a QEMU tool not named qemu-img.

    It stands for a writer this recovery cannot end: a qemu-img that the unit's
    ProtectProc=invisible hides from the service.
    """
    temp = make_image(tmp_path / ".disk.qcow2.virt-reclaim-j1.tmp", "16M")
    proc = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", "-c", f"sleep {HOLD_S * 1000}", str(temp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not guard.lock_held(str(temp)):
        assert proc.poll() is None, "qemu-io exited"
        assert time.monotonic() < deadline, "qemu-io never locked the image"
        time.sleep(0.02)
    try:
        yield temp, proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_temporary_image_locked_by_an_unseen_writer_is_left_and_the_job_stays_open(
    tmp_path: Path, holder: tuple[Path, subprocess.Popen[bytes]]
) -> None:
    temp, proc = holder
    image = make_image(tmp_path / "disk.qcow2", "16M")
    job = journaled_rewrite(tmp_path, image, temp)
    result = Recovered(job.id, job.domain, job.step, RecoveryOutcome.FAILED, [])

    began = time.monotonic()
    with pytest.raises(VirtError, match="still locked by a process this recovery cannot see") as e:
        mode_of("offline").recover(job, result, no_domain)

    assert f"held by qemu-io (pid {proc.pid})" in str(e.value)
    # A holder in sight that recovery may not end is not waited for.
    assert time.monotonic() - began < offline.UNSEEN_RELEASE_S
    assert temp.exists() and image.exists()
    assert proc.poll() is None, "recovery ended a process that is not a qemu-img"


def test_a_lock_that_goes_while_its_killed_holder_exits_is_waited_for(
    tmp_path: Path, holder: tuple[Path, subprocess.Popen[bytes]]
) -> None:
    """A killed writer may take seconds to exit (uninterruptible I/O): its lock is awaited."""
    temp, proc = holder
    ended = threading.Timer(0.5, proc.kill)
    ended.start()
    try:
        assert offline._lock_released(str(temp), killed=[proc.pid])
    finally:
        ended.cancel()
    assert proc.poll() is not None


def test_an_unlocked_temporary_image_is_removed_and_the_original_kept(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2", "16M")
    temp = make_image(tmp_path / ".disk.qcow2.virt-reclaim-j1.tmp", "16M")
    assert not guard.lock_held(str(temp))
    job = journaled_rewrite(tmp_path, image, temp)
    result = Recovered(job.id, job.domain, job.step, RecoveryOutcome.FAILED, [])

    mode_of("offline").recover(job, result, no_domain)

    assert not temp.exists() and image.exists()
    assert result.outcome is RecoveryOutcome.FAILED
    assert any(f"removed {temp}" in action for action in result.actions), result.actions


def test_a_lock_is_seen_whoever_holds_it(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2", "16M")
    assert not guard.lock_held(str(image))
    assert not guard.lock_held(str(tmp_path / "missing"))
    with subprocess.Popen(
        ["qemu-io", "-r", "-f", "qcow2", "-c", f"sleep {HOLD_S * 1000}", str(image)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ) as proc:  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not guard.lock_held(str(image)):
                assert time.monotonic() < deadline, "a read-only qemu-io took no lock"
                time.sleep(0.02)
        finally:
            proc.kill()
    assert not guard.lock_held(str(image))


def no_domain(uuid: str) -> DomainPort:
    """The lookup of a recovery that must not need the domain."""
    raise AssertionError(f"recovery looked domain {uuid} up")
