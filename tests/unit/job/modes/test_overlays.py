"""The live mode's overlay 1 is the job's own file, never one planted at its name.

The name is predictable (it carries the job's id, which the journal shows): a link
or a file put there before the snapshot must make the job fail before any snapshot
is asked for, with the planted file and its target left as they were. Real images
and qemu-img; the domain and its block jobs are faked (tests/fakes.py), so the
snapshot libvirt would take is only recorded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from fakes import FakeDisk, FakeDomain, OpenWatch, linux_fs, make_image, sh
from virt_reclaim.errors import VirtError
from virt_reclaim.image.imagefile import NewImage
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.context import Step
from virt_reclaim.job.frame import ReclaimJob
from virt_reclaim.job.modes import overlays
from virt_reclaim.job.results import Outcome
from virt_reclaim.job.settings import JobSettings, ModeName
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import BlockJob, DomainState

MIB = 1024 * 1024


class SnapshotJobs:
    """The block jobs of a guest that never gets past the snapshot (BlockJobsPort)."""

    def __init__(self, domain: FakeDomain, refusal: str | None) -> None:
        self._domain = domain
        self._refusal = refusal
        # What each snapshot was asked: the overlays, REUSE_EXT, and each overlay's
        # ``qemu-img info`` at that moment.
        self.snapshots: list[tuple[dict[str, str], bool, dict[str, Any]]] = []

    def snapshot_disk_only(
        self, overlays: Mapping[str, str], *, quiesce: bool, reuse_existing: bool
    ) -> None:
        infos = {
            path: json.loads(sh("qemu-img", "info", "--output=json", "-f", "qcow2", path))
            for path in overlays.values()
        }
        self.snapshots.append((dict(overlays), reuse_existing, infos))
        if self._refusal is not None:
            raise VirtError(f"{self._domain.name}: cannot take a snapshot: {self._refusal}")
        raise AssertionError("these tests never let a snapshot be taken")

    def active_job(self, target: str) -> BlockJob | None:
        return None

    def disk_chain(self, target: str, *, live: bool) -> tuple[str | None, ...]:
        return tuple(str(d.path) for d in self._domain.disks if d.target == target)

    def close(self) -> None:
        pass


class LiveFakeDomain(FakeDomain):
    refusal: str | None = None
    jobs: SnapshotJobs | None = None

    def block_jobs(self) -> SnapshotJobs:
        self.jobs = SnapshotJobs(self, self.refusal)
        return self.jobs


@pytest.fixture
def domain(tmp_path: Path) -> LiveFakeDomain:
    image = make_image(tmp_path / "disk.qcow2", "128M", ("write -P 0x61 0 16M",))
    return LiveFakeDomain(
        [FakeDisk("vda", image)], filesystems=[linux_fs("/", "vda", total=120 * MIB, used=17 * MIB)]
    )


def run_live(
    domain: FakeDomain, state: Path, plant: Any = None, images: QemuImg | None = None
) -> Any:
    job = ReclaimJob(
        domain, images or QemuImg(priority=None), JobSettings(min_gain=0, mode=ModeName.LIVE),
        images_of_other_domains=dict, journal=Journal(state), before_step=plant,
    )  # fmt: skip
    return job.run()


def first_overlay(state: Path) -> Path:
    """Overlay 1's name for the job under way, from the journal (as a local user could)."""
    [journaled] = Journal(state).unfinished()
    return Path(overlays.overlay_path(journaled.disks[0].path, journaled.id, 1))


@pytest.mark.parametrize("planted", ["link", "dangling link", "file"])
def test_a_file_or_link_planted_at_overlay_1_s_name_fails_the_job_before_the_snapshot(
    domain: LiveFakeDomain, tmp_path: Path, planted: str
) -> None:
    image = domain.disks[0].path
    before = image.read_bytes()
    canary = tmp_path / "host-canary"
    canary.write_bytes(b"host data\n" * 100)
    canary.chmod(0o600)
    canary_stat = canary.stat()
    state = tmp_path / "state"
    watch = OpenWatch(canary)
    at: list[Path] = []

    def plant(step: Step) -> None:
        if step is Step.SNAPSHOT:
            name = first_overlay(state)
            if planted == "link":
                name.symlink_to(canary)
            elif planted == "dangling link":
                # Where libvirt, told to create the overlay, would have made a file.
                name.symlink_to(tmp_path / "made-through-the-link")
            else:
                name.write_bytes(b"someone else's\n")
            at.append(name)

    try:
        result = run_live(domain, state, plant)
        opened = watch.opened()
    finally:
        watch.close()

    assert result.outcome is Outcome.FAILED, result.reason
    [name] = at
    assert f"something is already at {name}" in result.reason, result.reason
    assert domain.jobs is not None and domain.jobs.snapshots == [], "a snapshot was asked for"
    assert not opened, "the canary was opened"
    assert canary.read_bytes() == b"host data\n" * 100
    assert canary.stat().st_mtime_ns == canary_stat.st_mtime_ns
    assert canary.stat().st_mode & 0o7777 == 0o600
    if planted == "link":
        assert name.is_symlink() and os.readlink(name) == str(canary)
    elif planted == "dangling link":
        assert name.is_symlink() and not name.exists()
    else:
        assert name.read_bytes() == b"someone else's\n"
    assert image.read_bytes() == before
    assert domain.power is DomainState.RUNNING
    assert not any(c.startswith(("shutdown", "force_off", "start")) for c in domain.calls)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["disk.qcow2", "host-canary", name.name, "state"]
    )


def test_the_snapshot_reuses_the_job_s_own_overlay_whose_header_names_the_image_and_format(
    domain: LiveFakeDomain, tmp_path: Path
) -> None:
    """And a refused snapshot leaves no overlay behind (the guest does not run on it)."""
    domain.refusal = "unsupported configuration"
    image = domain.disks[0].path
    state = tmp_path / "state"

    result = run_live(domain, state)

    assert result.outcome is Outcome.FAILED, result.reason
    assert "unsupported configuration" in result.reason
    assert domain.jobs is not None
    [(asked, reuse_existing, infos)] = domain.jobs.snapshots
    assert reuse_existing
    [(target, path)] = asked.items()
    assert target == "vda"
    assert Path(path).parent == image.parent and path.endswith(".overlay1")
    info = infos[path]
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(image)
    assert info["backing-filename-format"] == "qcow2"  # written, not left to a probe
    assert info["virtual-size"] == 128 * MIB
    assert not os.path.lexists(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.qcow2", "state"]
    assert domain.power is DomainState.RUNNING


class RecordingQemuImg(QemuImg):
    """The job's qemu-img, recording the overlays it is asked to make."""

    def __init__(self) -> None:
        super().__init__(priority=None)
        self.overlays: list[str] = []

    def create_overlay(self, image: NewImage, *, backing: str, backing_format: str) -> None:
        self.overlays.append(image.path)
        super().create_overlay(image, backing=backing, backing_format=backing_format)


def test_the_live_mode_makes_its_overlays_with_the_job_s_qemu_img(
    domain: LiveFakeDomain, tmp_path: Path
) -> None:
    """Through the job's port, so the configured qemu_img runs it, as for every other run."""
    domain.refusal = "unsupported configuration"
    images = RecordingQemuImg()

    run_live(domain, tmp_path / "state", images=images)

    assert domain.jobs is not None
    [(asked, _reuse, _infos)] = domain.jobs.snapshots
    assert images.overlays == list(asked.values())


def test_an_overlay_whose_name_was_taken_over_is_not_removed(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2", "16M")
    victim = tmp_path / "host-file"
    victim.write_bytes(b"host data")
    made = overlays.new_overlay(QemuImg(), str(tmp_path / ".overlay1"), str(image), "qcow2", "vda")
    os.unlink(made.path)
    os.symlink(victim, made.path)

    overlays.remove_overlays([made])

    assert os.readlink(made.path) == str(victim)
    assert victim.read_bytes() == b"host data"


def test_an_overlay_still_the_job_s_own_is_removed(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2", "16M")
    made = overlays.new_overlay(QemuImg(), str(tmp_path / ".overlay1"), str(image), "qcow2", "vda")

    overlays.remove_overlays([made])

    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.qcow2"]


def test_recovery_clears_only_the_dead_jobs_own_unused_overlay_2(tmp_path: Path) -> None:
    """Before recovery copies again, it removes the dead job's overlay 2, and nothing else."""
    canary = tmp_path / "canary"
    canary.write_text("host file")
    planted = tmp_path / ".disk.qcow2.virt-reclaim-abc.overlay2"
    planted.symlink_to(canary)

    with pytest.raises(VirtError, match="not a file the job made"):
        overlays.clear_dead_overlay(str(planted), set())
    assert planted.is_symlink() and canary.read_text() == "host file"

    planted.unlink()
    planted.write_bytes(b"qcow2 of the dead job")
    with pytest.raises(VirtError, match="still in use"):
        overlays.clear_dead_overlay(str(planted), {str(planted)})
    assert planted.exists()

    overlays.clear_dead_overlay(str(planted), set())
    assert not planted.exists()
    overlays.clear_dead_overlay(str(planted), set())  # nothing there: nothing to do
