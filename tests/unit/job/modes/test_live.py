"""Recovery of a live job (live.recover_disk) at each chain a killed job can leave.

The block jobs are played by real qemu-img on real files: a commit is ``qemu-img
commit`` of the top into its base, a shallow copy copies the top's clusters onto the
new overlay (both name the image as backing). No QEMU runs, so the journal decides
whether the image was swapped (as under the unit's ProtectProc=invisible); the other
engineers' guests on this host must not decide it for the test.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from fakes import make_image, sh
from virt_reclaim import process
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.modes import live, mode_of, overlays
from virt_reclaim.job.ports import DomainPort
from virt_reclaim.job.results import Recovered, RecoveryOutcome
from virt_reclaim.job.settings import JobSettings
from virt_reclaim.journal.records import DiskState, JournalDisk
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import BlockJob

JOB = "j1"


@dataclass
class QemuImgBlockJobs:
    """The BlockJobsPort of one disk over real files: each block job done by qemu-img."""

    chain: list[str]
    left_running: BlockJob | None = None  # a block job the dead job started
    pending: tuple[str, str | None] | None = None
    calls: list[str] = field(default_factory=list)

    def snapshot_disk_only(
        self, overlays: Mapping[str, str], *, quiesce: bool, reuse_existing: bool
    ) -> None:
        raise AssertionError("recovery takes no snapshot")

    def copy_shallow(
        self, target: str, destination: str, *, destination_format: str = "qcow2"
    ) -> None:
        self.calls.append("copy")
        self.pending = ("copy", destination)

    def commit_active(self, target: str) -> None:
        self.calls.append("commit")
        self.pending = ("commit", None)

    def wait_ready(self, target: str, timeout: float) -> bool:
        return self.pending is not None

    def pivot(self, target: str, *, timeout: float = 30.0) -> None:
        assert self.pending is not None
        kind, destination = self.pending
        self.pending, self.left_running = None, None
        if kind == "commit":
            sh("qemu-img", "commit", "-q", self.chain[0])
            self.chain = self.chain[1:]
        else:
            assert destination is not None
            shutil.copyfile(self.chain[0], destination)  # same backing: the same disk
            self.chain = [destination, *self.chain[1:]]
        self.calls.append(f"pivot {kind}")

    def abort(self, target: str, *, timeout: float = 30.0) -> None:
        self.pending = None

    def active_job(self, target: str) -> BlockJob | None:
        return self.left_running

    def disk_source(self, target: str, *, live: bool) -> str | None:
        return self.chain[0]

    def disk_chain(self, target: str, *, live: bool) -> tuple[str | None, ...]:
        # The persistent definition names the image alone throughout (a disk-only
        # snapshot of a running guest changes only its live definition).
        return tuple(self.chain) if live else (self.chain[-1],)

    def close(self) -> None:
        pass


@dataclass
class Killed:
    """An image, the job's files beside it, and what a killed live job journaled."""

    image: Path
    temp: Path
    overlay1: Path
    overlay2: Path

    @classmethod
    def at(cls, tmp_path: Path) -> Killed:
        """The original holds 0xaa in its first 8 MiB; the guest then wrote 0xbb at 1 MiB."""
        image = make_image(tmp_path / "disk.qcow2", "64M", ("write -P 0xaa 0 8M",))
        path = str(image)
        killed = cls(image, tmp_path / f".disk.qcow2.virt-reclaim-{JOB}.tmp",
                     Path(overlays.overlay_path(path, JOB, 1)),
                     Path(overlays.overlay_path(path, JOB, 2)))  # fmt: skip
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", path,
                        str(killed.overlay1)], check=True, timeout=60)  # fmt: skip
        sh("qemu-io", "-f", "qcow2", "-c", "write -P 0xbb 1M 1M", str(killed.overlay1))
        return killed

    def swap_in_new_image(self) -> None:
        """What the rewrite did before the kill: a compact copy renamed over the image."""
        new = self.image.with_name("new.qcow2")
        sh("qemu-img", "convert", "-q", "-O", "qcow2", str(self.image), str(new))
        new.rename(self.image)

    def disk(self, state: DiskState | None) -> JournalDisk:
        return JournalDisk("vda", str(self.image), str(self.temp), None, state=state)

    def jobs(self, *chain: Path) -> QemuImgBlockJobs:
        return QemuImgBlockJobs([str(p) for p in chain])

    def job_files(self) -> list[Path]:
        return [p for p in (self.temp, self.overlay1, self.overlay2) if p.exists()]

    def guest_reads_its_writes(self) -> None:
        """The image alone holds the original data and the guest's write after the snapshot."""
        for check in ("read -P 0xaa 0 1M", "read -P 0xbb 1M 1M", "read -P 0xaa 2M 6M"):
            sh("qemu-io", "-f", "qcow2", "-c", check, str(self.image))
        info = sh("qemu-img", "info", "--output=json", str(self.image))
        assert "backing-filename" not in info


@pytest.fixture(autouse=True)
def no_qemu_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    """No QEMU reads these files: the journal decides whether the image was swapped."""
    monkeypatch.setattr(process, "any_named", lambda _prefixes: False)


def recover(disk: JournalDisk, jobs: QemuImgBlockJobs) -> tuple[bool, Recovered]:
    result = Recovered(JOB, "fake", "copy", RecoveryOutcome.FAILED, [])
    return live.recover_disk(JOB, disk, jobs, result, QemuImg()), result


def test_killed_before_the_swap_the_snapshot_is_committed_back(tmp_path: Path) -> None:
    killed = Killed.at(tmp_path)
    make_image(killed.temp, "64M", ("write -P 0xaa 0 1M",))  # a rewrite under way
    jobs = killed.jobs(killed.overlay1, killed.image)

    on_new, result = recover(killed.disk(DiskState.SNAPSHOTTED), jobs)

    assert not on_new
    assert jobs.chain == [str(killed.image)] and jobs.calls == ["commit", "pivot commit"]
    killed.guest_reads_its_writes()
    assert killed.job_files() == []
    assert result.found[0].swapped is False
    assert f"vda: committed the snapshot back into {killed.image}" in result.actions


def test_killed_after_the_swap_the_guest_is_moved_onto_the_new_image(tmp_path: Path) -> None:
    killed = Killed.at(tmp_path)
    killed.swap_in_new_image()
    jobs = killed.jobs(killed.overlay1, killed.image)

    on_new, result = recover(killed.disk(DiskState.SWAPPED), jobs)

    assert on_new
    assert jobs.calls == ["copy", "pivot copy", "commit", "pivot commit"]
    assert jobs.chain == [str(killed.image)]
    killed.guest_reads_its_writes()
    assert killed.job_files() == []
    assert "vda: finished the swap onto the new image" in result.actions


def test_killed_in_the_commit_of_overlay_2_the_commit_is_done_again(tmp_path: Path) -> None:
    killed = Killed.at(tmp_path)
    killed.swap_in_new_image()
    killed.overlay1.rename(killed.overlay2)  # the copy had moved the guest onto overlay 2
    jobs = killed.jobs(killed.overlay2, killed.image)

    on_new, _ = recover(killed.disk(DiskState.COPIED), jobs)

    assert on_new and jobs.chain == [str(killed.image)]
    killed.guest_reads_its_writes()
    assert killed.job_files() == []


def test_a_commit_left_running_is_pivoted_where_it_was_going(tmp_path: Path) -> None:
    killed = Killed.at(tmp_path)
    killed.swap_in_new_image()
    killed.overlay1.rename(killed.overlay2)
    jobs = killed.jobs(killed.overlay2, killed.image)
    jobs.commit_active("vda")  # started by the dead job
    jobs.left_running = BlockJob(type="commit", cur=100, end=100, bandwidth=0)

    on_new, result = recover(killed.disk(DiskState.COPIED), jobs)

    assert on_new and jobs.calls == ["commit", "pivot commit"]
    assert result.found[0].block_job == "commit"
    assert "vda: pivoted the commit left running" in result.actions
    killed.guest_reads_its_writes()


def test_killed_after_the_cleanup_began_only_its_leftovers_go(tmp_path: Path) -> None:
    killed = Killed.at(tmp_path)
    sh("qemu-img", "commit", "-q", str(killed.overlay1))
    killed.swap_in_new_image()
    jobs = killed.jobs(killed.image)

    on_new, result = recover(killed.disk(DiskState.COMMITTED), jobs)

    assert on_new and jobs.calls == []
    assert killed.job_files() == []
    assert f"vda: removed {killed.overlay1}" in result.actions


def test_a_chain_the_job_did_not_make_is_left_as_it_is(tmp_path: Path) -> None:
    killed = Killed.at(tmp_path)
    theirs = make_image(tmp_path / "someone-elses.qcow2", "64M")
    jobs = killed.jobs(theirs, killed.image)

    on_new, result = recover(killed.disk(DiskState.SNAPSHOTTED), jobs)

    assert not on_new and jobs.calls == []
    assert killed.job_files() == [killed.overlay1]
    assert any("not a chain this job made" in action for action in result.actions)


def test_the_mode_reports_the_job_reclaimed_when_every_disk_ends_on_its_new_image(
    tmp_path: Path,
) -> None:
    killed = Killed.at(tmp_path)
    killed.swap_in_new_image()
    jobs = killed.jobs(killed.overlay1, killed.image)
    journal = Journal(tmp_path / "state")
    journal.begin_job(JOB, "fake", "u1", JobSettings(), mode="live")
    journal.record_for_recovery(JOB, "running", [killed.disk(DiskState.SWAPPED)])
    journal.record_disk(JOB, "vda", state=DiskState.SWAPPED)
    [journaled] = journal.unfinished()

    class Domain:
        def block_jobs(self) -> QemuImgBlockJobs:
            return jobs

    result = Recovered(JOB, "fake", journaled.step, RecoveryOutcome.FAILED, [])
    # Recovery casts what it looks up to a LiveDomainPort and uses only its block jobs.
    mode_of("live").recover(journaled, result, lambda _uuid: cast(DomainPort, Domain()))

    assert result.outcome is RecoveryOutcome.RECLAIMED
    killed.guest_reads_its_writes()


def test_a_job_killed_before_its_snapshot_has_nothing_to_undo(tmp_path: Path) -> None:
    """No disk state recorded ("planned" comes before any overlay is made): nothing to do."""
    killed = Killed.at(tmp_path)
    killed.overlay1.unlink()
    journal = Journal(tmp_path / "state")
    journal.begin_job(JOB, "fake", "u1", JobSettings(), mode="live")
    journal.record_for_recovery(JOB, "running", [killed.disk(None)])
    journal.enter_step(JOB, "inspect")
    [journaled] = journal.unfinished()

    def no_lookup(_uuid: str) -> DomainPort:
        raise AssertionError("nothing to look up")

    result = Recovered(JOB, "fake", "inspect", RecoveryOutcome.FAILED, [])
    mode_of("live").recover(journaled, result, no_lookup)
    assert result.outcome is RecoveryOutcome.FAILED
    assert result.actions == ["the snapshot was never asked for: nothing to undo"]
