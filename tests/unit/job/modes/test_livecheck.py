"""What live mode refuses before anything changes: a host too old, a disk with a block job.

Through the job's ports: real images and real qemu-img, the domain faked
(tests/fakes.py) with the versions and block jobs libvirt would report. A refusal
must come before the guest is touched: no trim, no shutdown, the image as it was.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from fakes import FakeDisk, FakeDomain, linux_fs, make_image
from virt_reclaim import process
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.frame import ReclaimJob
from virt_reclaim.job.modes import live
from virt_reclaim.job.modes.livecheck import host_refusal
from virt_reclaim.job.results import Outcome
from virt_reclaim.job.settings import JobSettings, ModeName
from virt_reclaim.journal.records import DiskState, JournalDisk
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import BlockJob, DomainState, HostVersions, version_text

MIB = 1024 * 1024


@pytest.fixture
def domain(tmp_path: Path) -> FakeDomain:
    image = make_image(tmp_path / "disk.qcow2", "128M", ("write -P 0x61 0 16M",))
    return FakeDomain(
        [FakeDisk("vda", image)], filesystems=[linux_fs("/", "vda", total=120 * MIB, used=17 * MIB)]
    )


def run_live(domain: FakeDomain, state: Path) -> Any:
    job = ReclaimJob(
        domain,
        QemuImg(priority=None),
        JobSettings(min_gain=0, mode=ModeName.LIVE),
        images_of_other_domains=dict,
        journal=Journal(state),
    )
    return job.run()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("versions", "why"),
    [
        (HostVersions(5_010_000, 7_002_000), "libvirt 5.10.0 (needs 6.0.0) too old"),
        (HostVersions(9_000_000, 4_002_001), "QEMU 4.2.1 (needs 5.1.0) too old"),
        (HostVersions(4_000_000, 2_011_000),
         "libvirt 4.0.0 (needs 6.0.0) and QEMU 2.11.0 (needs 5.1.0) too old"),
    ],
)  # fmt: skip
def test_a_host_too_old_for_the_live_sequence_is_refused_before_anything_changes(
    domain: FakeDomain, tmp_path: Path, versions: HostVersions, why: str
) -> None:
    domain.host_versions = versions
    image = domain.disks[0].path
    before = sha256(image)

    result = run_live(domain, tmp_path / "state")

    assert result.outcome is Outcome.SKIPPED
    assert why in result.reason
    assert 'use mode = "offline"' in result.reason
    assert domain.calls == [], "the guest was touched"
    assert domain.power is DomainState.RUNNING
    assert sha256(image) == before


def test_a_disk_with_a_block_job_running_is_skipped_with_the_job_named(
    domain: FakeDomain, tmp_path: Path
) -> None:
    domain.foreign_block_jobs["vda"] = BlockJob(type="copy", cur=10, end=100, bandwidth=0)

    result = run_live(domain, tmp_path / "state")

    assert result.outcome is Outcome.SKIPPED
    [skipped] = result.skipped_disks
    assert skipped.target == "vda"
    assert skipped.reason == (
        "a copy block job is already running on it; live mode waits for it to end"
    )
    assert domain.calls == []


def test_a_shut_off_guest_on_an_old_host_is_reclaimed_offline(
    domain: FakeDomain, tmp_path: Path
) -> None:
    # Live mode's floor is the live sequence's: offline needs none of it.
    domain.power = DomainState.SHUTOFF
    domain.host_versions = HostVersions(4_000_000, 2_011_000)

    result = run_live(domain, tmp_path / "state")

    assert result.outcome is Outcome.RECLAIMED, result.reason
    assert result.mode == "offline"


def test_the_floor_itself_is_enough() -> None:
    assert host_refusal(HostVersions(6_000_000, 5_001_000)) is None
    assert version_text(9_000_000) == "9.0.0"
    assert version_text(7_002_010) == "7.2.10"


@pytest.mark.parametrize(
    "case",
    [
        ("qemu-system-x86", True, "swapped", False, False),  # QEMU reads the very file
        (None, True, "snapshotted", True, True),  # QEMU holds another: the rename came
        (None, False, "swapping", False, True),  # QEMU hidden: the journal's word
        (None, False, "swapping", True, False),
        (None, False, "snapshotted", False, False),
    ],
)
def test_live_recovery_sees_the_swap_in_what_qemu_holds_or_else_in_the_journal(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[str | None, bool, str, bool, bool],
) -> None:
    """Under ProtectProc=invisible the service cannot see QEMU's open files.

    A case: who holds the image's file, whether QEMU's processes can be seen, the
    journaled state, whether the temporary image is left, and the swap seen.
    """
    held_by, qemu_visible, state, temp_left, swapped = case
    temp = tmp_path / ".disk.tmp"
    if temp_left:
        temp.write_bytes(b"")
    disk = JournalDisk("vda", str(tmp_path / "disk.qcow2"), str(temp), None, DiskState(state))
    monkeypatch.setattr(process, "holders_of", lambda _p: [(1, held_by)] if held_by else [])
    monkeypatch.setattr(process, "any_named", lambda _prefixes: qemu_visible)
    assert live._swapped(disk) is swapped
