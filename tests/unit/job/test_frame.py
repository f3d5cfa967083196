"""The job's frame through its ports: every step's failure, the restore, and the rarer paths.

Real images and real qemu-img; the domain is faked (tests/fakes.py), and so is a
qemu-img that fails, where a test needs a tool to fail.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fakes import FakeDisk, FakeDomain, linux_fs, make_image, sh
from virt_reclaim.errors import QemuImgError
from virt_reclaim.image.imagefile import NewImage
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.context import Step
from virt_reclaim.job.frame import ReclaimJob
from virt_reclaim.job.results import Outcome
from virt_reclaim.job.settings import After, JobSettings
from virt_reclaim.journal.records import JournalError
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import DomainState

MIB = 1024 * 1024


class FailingConvert(QemuImg):
    """qemu-img whose convert fails (a full disk, a killed process...)."""

    def convert(self, source: str, target: NewImage, **_options: Any) -> None:
        os.write(target.fd, b"half an image")
        raise QemuImgError("qemu-img: error while writing at byte 0: No space left on device")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def domain(tmp_path: Path) -> FakeDomain:
    image = make_image(tmp_path / "disk.qcow2", "256M", ("write -P 0x61 0 32M",
                                                        "write -P 0 32M 32M"))  # fmt: skip
    return FakeDomain(
        [FakeDisk("vda", image)], filesystems=[linux_fs("/", "vda", total=240 * MIB, used=33 * MIB)]
    )


def run(
    domain: FakeDomain, state: Path, images: QemuImg | None = None, **settings: Any
) -> tuple[Any, Journal]:
    journal = Journal(state)
    before_step = settings.pop("before_step", None)
    job = ReclaimJob(
        domain,
        images or QemuImg(priority=None),
        JobSettings(**{"min_gain": 0, **settings}),
        images_of_other_domains=dict,
        journal=journal,
        before_step=before_step,
    )
    return job.run(), journal


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".virt-reclaim-" in p.name)


FAILING_STEPS = ["inspect", "estimate", "preflight", "free-space", "shutdown", "guard",
                 "preflight#2", "rewrite", "verify", "swap"]  # fmt: skip


@pytest.mark.parametrize("failing", FAILING_STEPS)
def test_a_failure_at_any_step_leaves_image_and_guest_as_they_were(
    domain: FakeDomain, tmp_path: Path, failing: str
) -> None:
    image = domain.disks[0].path
    original = sha256(image)
    name, _, nth = failing.partition("#")
    seen: list[str] = []

    def fail_at(step: Step) -> None:
        seen.append(str(step))
        if str(step) == name and seen.count(name) == int(nth or 1):
            raise OSError(f"injected failure before {failing}")

    result, journal = run(domain, tmp_path / "state", before_step=fail_at)

    assert result.outcome is Outcome.FAILED
    assert f"injected failure before {failing}" in result.reason
    assert sha256(image) == original
    assert leftovers(tmp_path) == []
    assert domain.power is DomainState.RUNNING
    [entry] = journal.history()
    assert entry.outcome == "failed" and entry.finished_at is not None


def test_when_the_job_and_the_restore_fail_both_are_reported(
    domain: FakeDomain, tmp_path: Path
) -> None:
    original = sha256(domain.disks[0].path)
    domain.start_error = "Failed to get 'write' lock"

    result, _ = run(domain, tmp_path / "state", images=FailingConvert(priority=None))

    assert result.outcome is Outcome.FAILED
    assert result.reason.startswith("qemu-img: error while writing at byte 0: No space left")
    assert "; then the guest could not be started again: " in result.reason
    assert "Failed to get 'write' lock" in result.reason
    assert sha256(domain.disks[0].path) == original
    assert leftovers(tmp_path) == []


def test_a_guest_started_during_the_job_is_left_running_and_nothing_changes(
    domain: FakeDomain, tmp_path: Path
) -> None:
    original = sha256(domain.disks[0].path)

    def someone_starts_it(step: Step) -> None:
        if step is Step.GUARD:
            domain.power = DomainState.RUNNING  # virsh start between the stop and the lock

    result, _ = run(domain, tmp_path / "state", before_step=someone_starts_it)

    assert result.outcome is Outcome.FAILED
    assert "the domain was started during the job (it is running)" in result.reason
    assert sha256(domain.disks[0].path) == original
    assert domain.calls.count("start") == 0  # it runs: nothing to bring back


def test_a_definition_changed_during_the_job_stops_it(domain: FakeDomain, tmp_path: Path) -> None:
    original = sha256(domain.disks[0].path)

    def someone_edits_it(step: Step) -> None:
        if step is Step.GUARD:
            domain.inactive_override = domain.observe().xml.replace("disk.qcow2", "other.qcow2")

    result, _ = run(domain, tmp_path / "state", before_step=someone_edits_it)

    assert result.outcome is Outcome.FAILED
    assert "vda: the definition changed during the job" in result.reason
    assert sha256(domain.disks[0].path) == original
    assert domain.power is DomainState.RUNNING


@pytest.mark.parametrize("change", ["snapshot", "format"])
def test_an_image_changed_while_the_guest_ran_stops_the_job_at_the_guard(
    domain: FakeDomain, tmp_path: Path, change: str
) -> None:
    """What a convert would silently drop: a snapshot taken, a format changed since inspect."""
    image = domain.disks[0].path

    def someone_changes_it(step: Step) -> None:
        if step is not Step.GUARD:
            return
        if change == "snapshot":
            sh("qemu-img", "snapshot", "-c", "taken-meanwhile", str(image))
        else:
            domain.inactive_override = domain.observe().xml.replace("type='qcow2'", "type='raw'")

    result, _ = run(domain, tmp_path / "state", before_step=someone_changes_it)

    assert result.outcome is Outcome.FAILED, result.reason
    expected = {
        "snapshot": "vda: the image changed during the job: snapshot_count 0 -> 1",
        "format": "vda: the definition changed during the job",
    }[change]
    assert expected in result.reason, result.reason
    if change == "snapshot":
        assert "taken-meanwhile" in sh("qemu-img", "snapshot", "-l", str(image))
    assert domain.power is DomainState.RUNNING
    assert sorted(p.name for p in image.parent.iterdir() if ".virt-reclaim-" in p.name) == []


def test_min_gain_percent(domain: FakeDomain, tmp_path: Path) -> None:
    result, _ = run(domain, tmp_path / "state", min_gain_percent=100.0)
    assert result.outcome is Outcome.NOTHING_TO_DO
    assert "below the minimum of 100 %" in result.reason
    assert domain.calls == []

    result, _ = run(domain, tmp_path / "state2", min_gain_percent=10.0)
    assert result.outcome is Outcome.RECLAIMED, result.reason


def test_an_agent_shutdown_that_loses_the_agent_socket_as_the_guest_goes_is_a_shutdown(
    domain: FakeDomain, tmp_path: Path
) -> None:
    # Seen under load: libvirt reports the guest powering off under its pending agent
    # call as an error; the job then asked ACPI, and failed on "domain is not running".
    domain.agent_shutdown_error = "internal error: End of file from agent socket"

    result, _ = run(domain, tmp_path / "state")

    assert result.outcome is Outcome.RECLAIMED, result.reason
    assert "shutdown(agent=False)" not in domain.calls
    assert domain.power is DomainState.RUNNING


class JournalRefusingRestore(Journal):
    """A journal whose disk fills just as the job would record bringing the guest back."""

    def enter_step(self, job_id: str, step: str) -> None:
        if step == "restore":
            raise JournalError("database or disk is full")
        super().enter_step(job_id, step)


def test_a_journal_that_cannot_record_the_restore_still_gets_the_guest_back(
    domain: FakeDomain, tmp_path: Path
) -> None:
    job = ReclaimJob(
        domain, QemuImg(priority=None), JobSettings(min_gain=0),
        images_of_other_domains=dict, journal=JournalRefusingRestore(tmp_path / "state"),
    )  # fmt: skip

    result = job.run()

    assert domain.power is DomainState.RUNNING
    assert "start" in domain.calls
    assert result.outcome is Outcome.RECLAIMED, result.reason


def test_after_off_leaves_a_reclaimed_guest_off(domain: FakeDomain, tmp_path: Path) -> None:
    result, _ = run(domain, tmp_path / "state", after=After.OFF)
    assert result.outcome is Outcome.RECLAIMED, result.reason
    assert domain.power is DomainState.SHUTOFF
    assert "start" not in domain.calls
    assert result.downtime_s > 0


def test_a_failed_job_with_after_off_still_brings_the_guest_back(
    domain: FakeDomain, tmp_path: Path
) -> None:
    result, _ = run(domain, tmp_path / "state", images=FailingConvert(priority=None),
                    after=After.OFF)  # fmt: skip
    assert result.outcome is Outcome.FAILED
    assert domain.power is DomainState.RUNNING


def test_a_folder_the_job_cannot_write_is_found_before_the_guest_is_stopped(
    domain: FakeDomain, tmp_path: Path
) -> None:
    """A read-only image folder (the unit's ReadWritePaths) skips the job, guest untouched."""
    image = domain.disks[0].path
    before = sha256(image)
    folder = image.parent
    subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], check=True)
    try:
        result, _journal = run(domain, tmp_path.parent / f"{tmp_path.name}-state")
    finally:
        subprocess.run(["umount", str(folder)], check=True)

    assert result.outcome is Outcome.SKIPPED, result.reason
    assert "cannot create" in result.reason and "Read-only file system" in result.reason
    assert not any(c.startswith("shutdown") for c in domain.calls)
    assert domain.power is DomainState.RUNNING
    assert sha256(image) == before
