"""guest.enable_discard through the ports: discard turned on in the definition, guest off.

Real images and qemu-img; the domain is faked (tests/fakes.py): its ``define_xml``
takes the disks' drivers from the new definition, as the next start would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import structlog

from fakes import FakeDisk, FakeDomain, linux_fs, make_image
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.context import Step
from virt_reclaim.job.frame import ReclaimJob
from virt_reclaim.job.modes import mode_of
from virt_reclaim.job.ports import DomainPort
from virt_reclaim.job.results import Outcome, Recovered, RecoveryOutcome
from virt_reclaim.job.settings import JobSettings
from virt_reclaim.journal.records import JournalDisk
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import DomainState

MIB = 1024 * 1024


@pytest.fixture
def domain(tmp_path: Path) -> FakeDomain:
    image = make_image(tmp_path / "disk.qcow2", "256M", ("write -P 0x61 0 32M",
                                                        "write -P 0 32M 32M"))  # fmt: skip
    return FakeDomain(
        [FakeDisk("vda", image, discard=False)],
        filesystems=[linux_fs("/", "vda", total=64 * MIB, used=33 * MIB)],
        fill_offset=128 * MIB,  # the guest's free space, where its zero-fill lands
    )


def run(domain: FakeDomain, state: Path, **settings: Any) -> tuple[Any, Journal]:
    journal = Journal(state)
    before_step = settings.pop("before_step", None)
    job = ReclaimJob(
        domain,
        QemuImg(priority=None),
        JobSettings(**{"min_gain": 0, **settings}),
        images_of_other_domains=dict,
        journal=journal,
        before_step=before_step,
    )
    return job.run(), journal


def test_discard_is_turned_on_while_the_guest_is_off_and_the_next_job_trims(
    domain: FakeDomain, tmp_path: Path
) -> None:
    with structlog.testing.capture_logs() as logs:
        result, journal = run(domain, tmp_path / "state", enable_discard=True)

    assert result.outcome is Outcome.RECLAIMED, result.reason
    assert result.free_space_plan.startswith("zero")  # no discard yet: this job zero-fills
    [disk] = result.disks
    assert (disk.discard, disk.discard_enabled) == (False, True)
    assert (domain.disks[0].discard, domain.disks[0].detect_zeroes) == (True, "unmap")
    # Defined after the swap, while the guest was off, before it started again.
    assert domain.calls[-2:] == ["define_xml", "start"]
    assert domain.power is DomainState.RUNNING
    [entry] = journal.history()
    assert entry.steps[-3:] == ("swap", "define", "restore")
    [updated] = [e for e in logs if e["event"] == "definition.updated"]
    assert updated["discard_enabled"] == ["vda"]

    again, _ = run(domain, tmp_path / "state", dry_run=True)
    assert again.free_space_plan.startswith("trim"), again.free_space_plan


def test_nothing_is_defined_without_the_setting(domain: FakeDomain, tmp_path: Path) -> None:
    result, journal = run(domain, tmp_path / "state")

    assert result.outcome is Outcome.RECLAIMED
    assert "define_xml" not in domain.calls
    assert "define" not in journal.history()[0].steps


def test_nothing_is_defined_when_discard_is_on_already(domain: FakeDomain, tmp_path: Path) -> None:
    domain.disks[0].discard, domain.disks[0].detect_zeroes = True, "unmap"

    result, journal = run(domain, tmp_path / "state", enable_discard=True)

    assert result.outcome is Outcome.RECLAIMED
    assert "define_xml" not in domain.calls
    assert not result.disks[0].discard_enabled
    assert "define" not in journal.history()[0].steps


def test_a_refused_definition_is_a_warning_the_reclaim_stands(
    domain: FakeDomain, tmp_path: Path
) -> None:
    domain.define_error = "XML error: invalid discard mode"
    with structlog.testing.capture_logs() as logs:
        result, _ = run(domain, tmp_path / "state", enable_discard=True)

    assert result.outcome is Outcome.RECLAIMED, result.reason
    assert result.disks[0].bytes_after is not None
    assert not result.disks[0].discard_enabled
    [warning] = [e for e in logs if e["event"] == "definition.not_updated"]
    assert "invalid discard mode" in warning["reason"]
    assert domain.power is DomainState.RUNNING
    assert domain.disks[0].discard is False


def test_a_change_made_to_the_definition_during_the_job_is_kept(
    domain: FakeDomain, tmp_path: Path
) -> None:
    def someone_edits(step: Step) -> None:
        if step is Step.DEFINE:
            # virsh edit while the guest is off: a description added.
            domain.inactive_override = domain.inactive_xml().replace(
                "<devices>", "<description>edited meanwhile</description><devices>"
            )

    result, _ = run(domain, tmp_path / "state", enable_discard=True, before_step=someone_edits)

    assert result.outcome is Outcome.RECLAIMED
    assert "<description>edited meanwhile</description>" in domain.defined[0]
    assert domain.disks[0].discard


def test_a_job_killed_in_its_define_step_is_recovered_as_reclaimed(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2", "16M")
    journal = Journal(tmp_path / "state")
    journal.begin_job("j1", "fake", "u1", JobSettings(), mode="offline")
    temp = str(tmp_path / ".disk.qcow2.virt-reclaim-j1.tmp")
    journal.record_for_recovery("j1", "running", [JournalDisk("vda", str(image), temp, None)])
    for step in ("shutdown", "guard", "rewrite", "verify", "swap", "define"):
        journal.enter_step("j1", step)
    [job] = journal.unfinished()
    result = Recovered(job.id, job.domain, job.step, RecoveryOutcome.FAILED, [])

    mode_of("offline").recover(job, result, no_domain)

    assert result.outcome is RecoveryOutcome.RECLAIMED


def test_detect_zeroes_on_becomes_unmap(domain: FakeDomain, tmp_path: Path) -> None:
    domain.disks[0].discard, domain.disks[0].detect_zeroes = True, "on"

    result, _ = run(domain, tmp_path / "state", enable_discard=True)

    assert result.outcome is Outcome.RECLAIMED
    assert result.disks[0].discard_enabled
    assert (domain.disks[0].discard, domain.disks[0].detect_zeroes) == (True, "unmap")


def no_domain(uuid: str) -> DomainPort:
    """The lookup of a recovery that must not need the domain."""
    raise AssertionError(f"recovery looked domain {uuid} up")
