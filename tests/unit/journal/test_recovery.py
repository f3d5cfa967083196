"""journal/recovery.py over a real journal, real image files and the fake domain.

Each case is a job journaled as a killed process leaves it; what is checked is what
recovery leaves: the files, the guest's state, the journal's record, and that a second
recovery finds nothing to do.
"""

from __future__ import annotations

from pathlib import Path

from fakes import FakeDisk, FakeDomain, make_image, sh
from virt_reclaim.errors import VirtError
from virt_reclaim.job.lock import DomainLock
from virt_reclaim.job.results import Recovered
from virt_reclaim.job.settings import JobSettings
from virt_reclaim.journal import recovery
from virt_reclaim.journal.records import DiskState, JournalDisk
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import DomainState

STEPS_TO_REWRITE = ("inspect", "shutdown", "guard", "preflight", "rewrite")


class Crashed:
    """A guest whose offline job was killed at ``step``: its image, temp file and journal."""

    def __init__(self, tmp_path: Path, *, step: str, mode: str = "offline") -> None:
        self.state = tmp_path / "state"
        self.image = make_image(tmp_path / "disk.qcow2", "64M", ("write -P 0xab 0 4M",))
        self.temp = tmp_path / ".disk.qcow2.virt-reclaim-j1.tmp"
        self.domain = FakeDomain([FakeDisk("vda", self.image)], power=DomainState.SHUTOFF)
        self.journal = Journal(self.state)
        self.journal.begin_job("j1", self.domain.name, self.domain.uuid, JobSettings(), mode=mode)
        self.journal.record_for_recovery(
            "j1", "running", [JournalDisk("vda", str(self.image), str(self.temp), None)]
        )
        for done in STEPS_TO_REWRITE[: STEPS_TO_REWRITE.index(step) + 1]:
            self.journal.enter_step("j1", done)

    def lookup(self, uuid: str) -> FakeDomain:
        assert uuid == self.domain.uuid
        return self.domain

    def recover(self) -> list[Recovered]:
        return recovery.recover(self.journal, str(self.state), self.lookup, agent_timeout_s=1)


def test_a_job_killed_in_its_rewrite_is_undone_and_the_guest_started_again(
    tmp_path: Path,
) -> None:
    crashed = Crashed(tmp_path, step="rewrite")
    make_image(crashed.temp, "64M", ("write -P 0xab 0 1M",))  # the half-written new image

    [done] = crashed.recover()

    assert (done.job_id, done.step, done.outcome) == ("j1", "rewrite", "failed")
    assert not crashed.temp.exists()
    sh("qemu-io", "-f", "qcow2", "-c", "read -P 0xab 0 4M", str(crashed.image))
    assert crashed.domain.power is DomainState.RUNNING
    assert crashed.domain.calls == ["start"]
    [job] = crashed.journal.history()
    assert job.outcome == "failed" and job.finished_at is not None
    assert job.reason is not None
    assert job.reason.startswith("recovered after the job was interrupted at step rewrite: ")
    assert f"removed {crashed.temp}" in job.reason
    assert "started the guest again" in job.reason
    # Done once: the next recovery finds nothing, and starts nothing.
    assert crashed.recover() == []
    assert crashed.domain.calls == ["start"]


def test_a_guest_that_was_off_before_the_job_stays_off(tmp_path: Path) -> None:
    crashed = Crashed(tmp_path, step="preflight")
    crashed.journal.record_for_recovery(
        "j1", "shut off", [JournalDisk("vda", str(crashed.image), str(crashed.temp), None)]
    )
    [done] = crashed.recover()
    assert done.outcome == "failed"
    assert crashed.domain.power is DomainState.SHUTOFF and crashed.domain.calls == []
    assert crashed.journal.unfinished() == []


def test_a_job_whose_process_still_holds_the_lock_is_left_alone(tmp_path: Path) -> None:
    crashed = Crashed(tmp_path, step="rewrite")
    make_image(crashed.temp, "64M")
    with DomainLock(crashed.state, crashed.domain.uuid):
        assert crashed.recover() == []
    assert crashed.temp.exists()
    assert crashed.domain.power is DomainState.SHUTOFF
    assert [j.id for j in crashed.journal.unfinished()] == ["j1"]


def test_a_guest_that_cannot_start_fails_the_job_with_the_reason(tmp_path: Path) -> None:
    crashed = Crashed(tmp_path, step="rewrite")
    crashed.domain.start_error = "no memory"
    [done] = crashed.recover()
    assert done.outcome == "failed"
    [job] = crashed.journal.history()
    assert job.reason is not None and "could not start the guest again" in job.reason
    assert "no memory" in job.reason


def test_a_mode_this_version_does_not_know_leaves_the_disks_as_they_are(tmp_path: Path) -> None:
    crashed = Crashed(tmp_path, step="rewrite", mode="teleport")
    make_image(crashed.temp, "64M")
    [done] = crashed.recover()
    assert done.outcome == "failed"
    assert any("left the disks as they are" in action for action in done.actions), done.actions
    assert crashed.temp.exists()  # not this version's to judge
    assert crashed.journal.unfinished() == []


def test_a_recovery_that_cannot_finish_now_leaves_the_job_for_the_next(tmp_path: Path) -> None:
    """A live job whose domain cannot be looked up: nothing done, tried again later."""
    crashed = Crashed(tmp_path, step="rewrite", mode="live")
    crashed.journal.record_disk("j1", "vda", state=DiskState.SNAPSHOTTED)

    def unreachable(_uuid: str) -> FakeDomain:
        raise VirtError("libvirtd does not answer")

    [done] = recovery.recover(crashed.journal, str(crashed.state), unreachable)
    assert done.outcome == "unfinished"
    assert any("could not finish" in action for action in done.actions), done.actions
    assert [j.id for j in crashed.journal.unfinished()] == ["j1"]
    # The lock was released: the next recovery gets to try.
    with DomainLock(crashed.state, crashed.domain.uuid):
        pass
