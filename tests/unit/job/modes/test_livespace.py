"""A live job's space on the host: what it reserves, and what it does when the room goes.

Real images and real qemu-img on a real (tmpfs) filesystem; the running guest is faked
(tests/fakes.py) and so are its block jobs (``FakeBlockJobs``): the snapshot makes a
real overlay file, the chain is what the fake records, the guest writes nothing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog

from fakes import MIB, FakeDisk, FakeDomain, linux_fs, make_image, write_data
from testbed.content import log_text
from virt_reclaim.image.imagefile import NewImage
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.context import Step
from virt_reclaim.job.frame import ReclaimJob
from virt_reclaim.job.freespace import budget
from virt_reclaim.job.freespace.budget import Reserve
from virt_reclaim.job.modes import livespace
from virt_reclaim.job.results import JobResult, Outcome
from virt_reclaim.job.settings import FreeSpaceMethod, JobSettings, ModeName
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import BlockJob, DomainState

GIB = 1024 * MIB


@dataclass
class FakeBlockJobs:
    """The BlockJobsPort over real overlay files: chains recorded, block jobs instant."""

    chains: dict[str, list[str]]
    calls: list[str] = field(default_factory=list)
    pending: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    def snapshot_disk_only(
        self, overlays: Mapping[str, str], *, quiesce: bool, reuse_existing: bool
    ) -> None:
        for target, overlay in overlays.items():
            base = self.chains[target][0]
            if reuse_existing:  # as libvirt with REUSE_EXT: the job made the overlay
                assert os.path.isfile(overlay), overlay
            else:
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                                base, overlay], check=True, timeout=60)  # fmt: skip
            self.chains[target].insert(0, overlay)
        self.calls.append("snapshot")

    def copy_shallow(
        self, target: str, destination: str, *, destination_format: str = "qcow2"
    ) -> None:
        self.calls.append(f"copy {target}")
        self.pending[target] = ("copy", destination)

    def commit_active(self, target: str) -> None:
        self.calls.append(f"commit {target}")
        self.pending[target] = ("commit", None)

    def wait_ready(self, target: str, timeout: float) -> bool:
        return target in self.pending

    def pivot(self, target: str, *, timeout: float = 30.0) -> None:
        kind, destination = self.pending.pop(target)
        chain = self.chains[target]
        self.chains[target] = [destination, *chain[1:]] if destination else chain[1:]
        self.calls.append(f"pivot {kind} {target}")

    def abort(self, target: str, *, timeout: float = 30.0) -> None:
        self.pending.pop(target, None)

    def active_job(self, target: str) -> BlockJob | None:
        return None

    def disk_source(self, target: str, *, live: bool) -> str | None:
        return self.chains[target][0]

    def disk_chain(self, target: str, *, live: bool) -> tuple[str | None, ...]:
        return tuple(self.chains[target])

    def close(self) -> None:
        pass


@dataclass
class LiveDomain(FakeDomain):
    """A running fake guest whose disks take snapshots and block jobs (FakeBlockJobs)."""

    jobs: FakeBlockJobs | None = None

    def block_jobs(self) -> FakeBlockJobs:
        if self.jobs is None:
            self.jobs = FakeBlockJobs({d.target: [str(d.path)] for d in self.disks})
        return self.jobs


class HoggedConvert(QemuImg):
    """Another program takes the host down to ``leave`` bytes free as the rewrite starts."""

    def __init__(self, host: Path, leave: int) -> None:
        super().__init__(priority=None)
        self._host, self._leave = host, leave
        self.free_seen: list[int] = []

    def convert(self, source: str, target: NewImage, **options: Any) -> None:
        free = budget.host_filesystem(str(self._host)).free
        subprocess.run(["fallocate", "-l", str(free - self._leave), str(self._host / "hog")],
                       check=True, timeout=30)  # fmt: skip
        watcher = threading.Thread(target=self._sample, args=(target.path,), daemon=True)
        watcher.start()
        super().convert(source, target, **options)

    def _sample(self, target: str) -> None:
        while Path(target).exists() or not self.free_seen:
            self.free_seen.append(budget.host_filesystem(str(self._host)).free)
            time.sleep(0.05)


@pytest.fixture
def small_host(make_tmpfs: Any) -> Path:
    host: Path = make_tmpfs("600M")
    return host


def dirty_image(path: Path) -> Path:
    """16 MiB of log text, 4 MiB random live, 24 MiB random deleted (still allocated)."""
    make_image(path, "512M")
    write_data(path, 0, log_text(16 * MIB))
    write_data(path, 16 * MIB, os.urandom(4 * MIB))
    write_data(path, 128 * MIB, os.urandom(24 * MIB))
    return path


def live_domain(image: Path) -> LiveDomain:
    return LiveDomain(
        [FakeDisk("vda", image, discard=False)],
        filesystems=[linux_fs("/", "vda", total=974 * MIB, used=44 * MIB)],
    )


def live_job(domain: LiveDomain, state: Path, reserve: int, **options: Any) -> ReclaimJob:
    images = options.pop("images", None) or QemuImg(priority=None)
    before_step = options.pop("before_step", None)
    settings = JobSettings(min_gain=0, mode=ModeName.LIVE, free_space=FreeSpaceMethod.NONE,
                           reserve=Reserve(host_percent=0, host_min_bytes=reserve),
                           **options)  # fmt: skip
    return ReclaimJob(domain, images, settings, images_of_other_domains=dict,
                      journal=Journal(state), before_step=before_step)  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_each_overlay_is_bounded_by_an_allowance_that_grows_with_the_disk() -> None:
    assert livespace.overlay_bound(16 * MIB) == 2 * 16 * MIB  # never more than the disk
    assert livespace.overlay_bound(1 * GIB) == 2 * 64 * MIB
    assert livespace.overlay_bound(64 * GIB) == 2 * 2 * GIB


def test_a_live_job_reserves_the_rewrite_and_its_overlays_in_the_journal(
    small_host: Path, tmp_path: Path
) -> None:
    image = dirty_image(small_host / "disk.qcow2")
    measured = QemuImg(priority=None).measure(str(image), force_share=True, image_format="qcow2")
    domain = live_domain(image)
    device = os.stat(small_host).st_dev
    held: list[int] = []

    def look(step: Step) -> None:
        if step is Step.SNAPSHOT:
            held.append(Journal(tmp_path / "state").reserved_elsewhere("another job", device))

    result = live_job(domain, tmp_path / "state", 100 * MIB, before_step=look).run()

    assert result.outcome is Outcome.RECLAIMED, result.reason
    need = measured + livespace.overlay_bound(512 * MIB)
    assert held == [need + max(budget.REWRITE_MARGIN, need // 50)]
    assert Journal(tmp_path / "state").reserved_elsewhere("another job", device) == 0
    assert domain.block_jobs().chains == {"vda": [str(image)]}
    assert sorted(p.name for p in small_host.iterdir()) == ["disk.qcow2"]


def test_a_live_job_whose_overlays_do_not_fit_is_skipped_before_the_snapshot(
    small_host: Path, tmp_path: Path
) -> None:
    image = dirty_image(small_host / "disk.qcow2")
    before = sha256(image)
    domain = live_domain(image)
    # About 555 MiB free: the rewrite alone (about 110 MiB with its margin) fits above a
    # 400 MiB reserve, the rewrite with the overlays of a 512 MiB disk (128 MiB more) does not.
    result = live_job(domain, tmp_path / "state", 400 * MIB).run()

    assert result.outcome is Outcome.SKIPPED, result.reason
    assert f"not enough free space on the filesystem of {small_host}" in result.reason
    assert "the rewrite and its overlays need up to" in result.reason
    assert "400.0 MiB must stay free" in result.reason
    assert domain.jobs is None or domain.jobs.calls == []
    assert domain.power is DomainState.RUNNING
    assert sha256(image) == before


def run_logged(job: ReclaimJob) -> tuple[JobResult, list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as events:
        result = job.run()
    return result, [dict(e) for e in events]


def test_below_the_reserve_during_the_rewrite_the_snapshot_is_committed_back(
    small_host: Path, tmp_path: Path
) -> None:
    image = dirty_image(small_host / "disk.qcow2")
    before = sha256(image)
    domain = live_domain(image)
    reserve = 100 * MIB
    images = HoggedConvert(small_host, leave=reserve - 20 * MIB)
    job = live_job(domain, tmp_path / "state", reserve, images=images, rate_limit=4 * MIB)

    result, events = run_logged(job)

    assert result.outcome is Outcome.FAILED, result.reason
    assert f"the host filesystem of {small_host} fell to" in result.reason, result.reason
    assert "below its reserve of 100.0 MiB" in result.reason
    jobs = domain.block_jobs()
    # The convert stopped, then the snapshot committed back into the untouched base.
    assert jobs.calls == ["snapshot", "commit vda", "pivot commit vda"]
    assert jobs.chains == {"vda": [str(image)]}
    assert [e["target"] for e in events if e["event"] == "live.undone"] == ["vda"]
    assert sha256(image) == before
    assert sorted(p.name for p in small_host.iterdir()) == ["disk.qcow2", "hog"]
    assert min(images.free_seen) >= reserve // 2, (min(images.free_seen), reserve)
    assert domain.power is DomainState.RUNNING
    assert not Journal(tmp_path / "state").unfinished()


def test_after_the_swap_a_copy_that_would_not_fit_is_not_started(
    small_host: Path, tmp_path: Path
) -> None:
    image = dirty_image(small_host / "disk.qcow2")
    domain = live_domain(image)
    reserve = 100 * MIB

    def another_writer(step: Step) -> None:
        if step is Step.COPY:
            # Half the reserve left, less than overlay 1 holds: the copy would go below it.
            free = budget.host_filesystem(str(small_host)).free
            subprocess.run(["fallocate", "-l", str(free - reserve // 2 + 64 * 1024),
                            str(small_host / "hog")], check=True, timeout=30)  # fmt: skip

    job = live_job(domain, tmp_path / "state", reserve, before_step=another_writer)

    result, events = run_logged(job)

    assert result.outcome is Outcome.FAILED, result.reason
    assert "vda: the copy was not started: the host filesystem of" in result.reason
    assert "'virt-reclaim recover'" in result.reason
    [refused] = [e for e in events if e["event"] == "live.block_job_refused"]
    assert refused["job"] == "copy"
    jobs = domain.block_jobs()
    assert "copy vda" not in jobs.calls
    # A consistent chain: overlay 1 over the new image, left for recovery to finish.
    assert jobs.chains["vda"][1:] == [str(image)]
    [unfinished] = Journal(tmp_path / "state").unfinished()
    assert [d.state for d in unfinished.disks] == ["swapped"]
