"""The free-space step and the estimate through the job's ports: real images, a faked guest.

A zero-fill here is qemu-io writing zeros into the real image on a real (tmpfs)
filesystem, so the host fills exactly as it would under a guest.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from fakes import (
    MIB,
    RHEL_AGENT,
    WINDOWS_AGENT,
    FakeDisk,
    FakeDomain,
    linux_fs,
    make_image,
    write_data,
)
from testbed.content import log_text
from virt_reclaim.image.imagefile import NewImage
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.context import Step
from virt_reclaim.job.frame import ReclaimJob
from virt_reclaim.job.freespace import budget
from virt_reclaim.job.freespace.budget import Reserve
from virt_reclaim.job.results import JobResult, Outcome
from virt_reclaim.job.settings import Compression, FreeSpaceMethod, JobSettings
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import DomainState, TrimmedPath

GIB = 1024 * MIB


def run_job(
    domain: FakeDomain, state: Path, **settings: Any
) -> tuple[JobResult, list[dict[str, Any]]]:
    journal = Journal(state)
    job = ReclaimJob(
        domain,
        QemuImg(priority=None),
        JobSettings(**settings),
        images_of_other_domains=dict,
        journal=journal,
    )
    with structlog.testing.capture_logs() as events:
        result = job.run()
    return result, [dict(e) for e in events]


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


def same_guest_content(first: Path, second: Path) -> bool:
    argv = ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(first), str(second)]
    return subprocess.run(argv, capture_output=True, timeout=120, check=False).returncode == 0


def dirty_image(path: Path) -> Path:
    """32 MiB of log text and 8 MiB random live, 64 MiB random deleted (still allocated)."""
    make_image(path)
    write_data(path, 0, log_text(32 * MIB))
    write_data(path, 32 * MIB, os.urandom(8 * MIB))
    write_data(path, 128 * MIB, os.urandom(64 * MIB))
    return path


@pytest.fixture
def small_host(make_tmpfs: Callable[[str], Path]) -> Path:
    return make_tmpfs("600M")


def test_zero_fill_stays_within_the_room_the_host_has(small_host: Path, tmp_path: Path) -> None:
    image = dirty_image(small_host / "disk.qcow2")
    original = shutil.copy(image, tmp_path / "original.qcow2")
    free_during: list[int] = []
    domain = FakeDomain(
        [FakeDisk("vda", image, discard=False)],
        filesystems=[linux_fs("/", "vda", total=974 * MIB, used=44 * MIB)],
        on_fill_chunk=lambda _written: free_during.append(
            budget.host_filesystem(str(small_host)).free
        ),
    )
    reserve = Reserve(host_percent=0, host_min_bytes=100 * MIB)

    result, events = run_job(domain, tmp_path / "state", free_space=FreeSpaceMethod.AUTO,
                             reserve=reserve, min_gain=0)  # fmt: skip

    assert result.outcome is Outcome.RECLAIMED, result.reason
    [done] = named(events, "free_space.done")
    [fill] = done["fills"]
    # The fill wrote its whole limit, which stopped well short of the guest's free space...
    assert fill["zeroed_bytes"] == fill["limit_bytes"] > 64 * MIB
    assert fill["left_bytes"] > 500 * MIB
    # ...because the host had room for no more: it never went below the reserve plus the
    # rewrite's need, and never near zero.
    need = QemuImg().measure(str(original), force_share=False) + budget.REWRITE_MARGIN
    assert min(free_during) >= 100 * MIB + need
    assert same_guest_content(Path(original), image)
    assert domain.power is DomainState.RUNNING
    assert domain.calls[-1] == "start"
    # The fill wrote elsewhere than the deleted data (as ext4 may): both estimates, before
    # the fill and after it, know that what the fill did not reach may keep it.
    [disk] = result.disks
    assert disk.bytes_after is not None and disk.estimated_after is not None
    assert abs(disk.estimated_after - disk.bytes_after) <= 0.25 * disk.bytes_after, disk
    [again] = named(events, "disk.reestimated")
    assert abs(again["estimated_after"] - disk.bytes_after) <= 0.25 * disk.bytes_after, again


def test_zero_fill_is_skipped_when_the_host_has_no_room(small_host: Path, tmp_path: Path) -> None:
    image = dirty_image(small_host / "disk.qcow2")
    domain = FakeDomain(
        [FakeDisk("vda", image, discard=False)],
        filesystems=[linux_fs("/", "vda", total=974 * MIB, used=44 * MIB)],
    )
    # The rewrite (about 170 MiB of about 500 free) fits beside the reserve; no fill does.
    reserve = Reserve(host_percent=0, host_min_bytes=300 * MIB)

    result, events = run_job(domain, tmp_path / "state", reserve=reserve, min_gain=0)

    assert result.outcome is Outcome.RECLAIMED, result.reason
    assert not any(c.startswith("zero-fill") for c in domain.calls)
    [problem] = named(events, "free_space.unavailable")
    assert f"no room on the host filesystem of {small_host}" in problem["reason"]


def test_the_watch_stops_the_fill_when_another_writer_takes_the_room(
    small_host: Path, tmp_path: Path
) -> None:
    image = dirty_image(small_host / "disk.qcow2")
    original = shutil.copy(image, tmp_path / "original.qcow2")
    hog = small_host / "other-guest.img"

    def another_guest_writes(written: int) -> None:
        if written == 8 * MIB:
            free = budget.host_filesystem(str(small_host)).free
            subprocess.run(["fallocate", "-l", str(free - 150 * MIB), str(hog)], check=True)

    domain = FakeDomain(
        [FakeDisk("vda", image, discard=False)],
        filesystems=[linux_fs("/", "vda", total=974 * MIB, used=44 * MIB)],
        on_fill_chunk=another_guest_writes,
    )
    reserve = Reserve(host_percent=0, host_min_bytes=100 * MIB)

    result, events = run_job(domain, tmp_path / "state", reserve=reserve, min_gain=0)

    [stopped] = named(events, "free_space.stopped")
    assert f"the host filesystem of {small_host}" in stopped["reason"]
    # With the room gone, the job stops before the guest goes down: nothing changed.
    assert result.outcome is Outcome.SKIPPED, result.reason
    assert "not enough free space" in result.reason
    assert not result.waits_for_space, "no other job holds the space: waiting would not help"
    assert not any(c.startswith("shutdown") for c in domain.calls)
    assert domain.power is DomainState.RUNNING
    assert same_guest_content(Path(original), image)
    assert sorted(p.name for p in small_host.iterdir()) == ["disk.qcow2", hog.name]


def test_a_guest_paused_during_the_fill_stops_the_job_and_names_the_filesystem(
    small_host: Path, tmp_path: Path
) -> None:
    image = dirty_image(small_host / "disk.qcow2")
    domain = FakeDomain(
        [FakeDisk("vda", image, discard=False)],
        filesystems=[linux_fs("/", "vda", total=974 * MIB, used=44 * MIB)],
    )

    def qemu_pauses(_written: int) -> None:
        domain.power = DomainState.PAUSED

    domain.on_fill_chunk = qemu_pauses
    reserve = Reserve(host_percent=0, host_min_bytes=100 * MIB)

    result, events = run_job(domain, tmp_path / "state", reserve=reserve, min_gain=0)

    assert result.outcome is Outcome.FAILED
    assert "paused during the zero-fill" in result.reason
    assert f"the host filesystem of {small_host}" in result.reason
    assert "virsh resume fake" in result.reason
    [error] = named(events, "free_space.guest_paused")
    assert error["log_level"] == "error"
    # Nothing was tried on a paused guest: no shutdown, no start.
    assert not any(c.startswith(("shutdown", "start")) for c in domain.calls)
    assert [p.name for p in small_host.iterdir()] == ["disk.qcow2"]


def test_windows_guests_are_trimmed_and_their_trim_reply_is_read(tmp_path: Path) -> None:
    image = dirty_image(tmp_path / "disk.qcow2")
    domain = FakeDomain(
        [FakeDisk("vda", image, discard=False)],
        agent=WINDOWS_AGENT,
        filesystems=[linux_fs("C:\\", "vda", total=974 * MIB, used=44 * MIB)],
        trim_reply=[TrimmedPath("C:\\", None, None),
                    TrimmedPath("D:\\", None, "the volume is not thin-provisioned")],
    )  # fmt: skip

    result, events = run_job(domain, tmp_path / "state", min_gain=0)

    assert result.outcome is Outcome.RECLAIMED, result.reason
    assert result.free_space == "trim"
    assert not any(c.startswith("zero-fill") for c in domain.calls)
    [estimated] = named(events, "disk.estimated")
    assert "Windows" in estimated["free_space_why"]
    [problem] = named(events, "free_space.unavailable")
    assert "D:\\: the volume is not thin-provisioned" in problem["reason"]


def test_an_agent_without_guest_exec_frees_nothing_and_the_estimate_knows(tmp_path: Path) -> None:
    image = dirty_image(tmp_path / "disk.qcow2")
    domain = FakeDomain(
        [FakeDisk("vda", image, discard=False)],
        agent=RHEL_AGENT,
        filesystems=[linux_fs("/", "vda", total=974 * MIB, used=44 * MIB)],
    )

    result, events = run_job(domain, tmp_path / "state", min_gain=0)

    assert result.outcome is Outcome.RECLAIMED, result.reason
    assert result.free_space == "none"
    [estimated] = named(events, "disk.estimated")
    assert estimated["freed_share"] == 0
    assert "guest-exec disabled" in estimated["free_space_why"]
    [disk] = [d.to_json() for d in result.disks]
    # The 64 MiB of deleted random data stays: the estimate says so, within 25 %.
    assert disk["bytes_after"] > 64 * MIB
    assert abs(disk["estimated_after"] - disk["bytes_after"]) <= 0.25 * disk["bytes_after"]


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_the_estimate_matches_the_result_on_first_and_repeated_reclaims(
    tmp_path: Path, compression: str
) -> None:
    image = dirty_image(tmp_path / "disk.qcow2")
    domain = FakeDomain(
        [FakeDisk("vda", image, discard=True)],
        filesystems=[linux_fs("/", "vda", total=974 * MIB, used=44 * MIB)],
        trim_discards=[(128 * MIB, 64 * MIB)],
    )
    settings = {"compression": Compression(compression), "min_gain": 0}

    first, _ = run_job(domain, tmp_path / "state", **settings)
    # The guest writes and deletes another 64 MiB; a trim will discard it.
    write_data(image, 256 * MIB, os.urandom(64 * MIB))
    domain.trim_discards = [(256 * MIB, 64 * MIB)]
    second, events = run_job(domain, tmp_path / "state", **settings)

    for result in (first, second):
        assert result.outcome is Outcome.RECLAIMED, result.reason
        [disk] = [d.to_json() for d in result.disks]
        error = abs(disk["estimated_after"] - disk["bytes_after"]) / disk["bytes_after"]
        assert error <= 0.25, (compression, disk)
    [estimated] = named(events, "disk.estimated")
    assert estimated["basis"] == "history"
    [history] = Journal(tmp_path / "state").history()[:1]
    assert history.estimated_after == second.disks[0].estimated_after


def test_a_trim_that_frees_the_space_in_place_is_a_reclaim_without_downtime(
    tmp_path: Path,
) -> None:
    image = dirty_image(tmp_path / "disk.qcow2")
    domain = FakeDomain(
        [FakeDisk("vda", image, discard=True)],
        filesystems=[linux_fs("/", "vda", total=974 * MIB, used=44 * MIB)],
        trim_discards=[(128 * MIB, 64 * MIB)],
    )

    result, events = run_job(domain, tmp_path / "state", min_gain=50 * MIB)

    # The trim gave back the 64 MiB deleted; compressing the rest would gain less than the
    # minimum: no shutdown, and the job says what it freed.
    assert result.outcome is Outcome.RECLAIMED, result.reason
    assert "freed" in result.reason and "in place" in result.reason
    assert not any(c.startswith("shutdown") for c in domain.calls)
    assert result.downtime_s == 0
    [disk] = result.disks
    assert disk.bytes_after is not None
    assert disk.bytes_before - disk.bytes_after >= 60 * MIB
    [entry] = Journal(tmp_path / "state").history()
    assert (entry.outcome, entry.bytes_after) == ("reclaimed", disk.bytes_after)
    # A success ends the step: it is not logged as the step's failure.
    assert not named(events, "step.failed")
    [freed] = [e for e in named(events, "step.finished") if e["step"] == "free-space"]
    assert "in place" in freed["result"]


class HoggedConvert(QemuImg):
    """Another program takes the room as the rewrite starts, down to ``leave`` bytes free."""

    def __init__(self, host: Path, leave: int, free_seen: list[int]) -> None:
        super().__init__(priority=None)
        self._host, self._leave, self._free_seen = host, leave, free_seen

    def convert(self, source: str, target: NewImage, **options: Any) -> None:
        free = budget.host_filesystem(str(self._host)).free
        subprocess.run(["fallocate", "-l", str(free - self._leave), str(self._host / "hog")],
                       check=True)  # fmt: skip
        watcher = threading.Thread(target=self._watch, args=(target.path,), daemon=True)
        watcher.start()
        super().convert(source, target, **options)

    def _watch(self, target: str) -> None:
        while Path(target).exists() or not self._free_seen:
            self._free_seen.append(budget.host_filesystem(str(self._host)).free)
            time.sleep(0.05)


def test_the_rewrite_stops_when_another_writer_takes_the_host_below_its_reserve(
    small_host: Path, tmp_path: Path
) -> None:
    """Its own writes stopped and removed, the original untouched, the guest as it was."""
    image = dirty_image(small_host / "disk.qcow2")
    original = sha256(image)
    domain = FakeDomain(
        [FakeDisk("vda", image, discard=False)],
        filesystems=[linux_fs("/", "vda", total=974 * MIB, used=44 * MIB)],
    )
    reserve = 100 * MIB
    free_seen: list[int] = []
    job = ReclaimJob(
        domain,
        HoggedConvert(small_host, leave=reserve - 20 * MIB, free_seen=free_seen),
        JobSettings(
            min_gain=0,
            free_space=FreeSpaceMethod.NONE,
            reserve=Reserve(host_percent=0, host_min_bytes=reserve),
            rate_limit=4 * MIB,  # the rewrite takes seconds: the watch sees it under way
        ),
        images_of_other_domains=dict,
        journal=Journal(tmp_path / "state"),
    )

    result = job.run()

    assert result.outcome is Outcome.FAILED, result.reason
    assert "vda: stopped the rewrite: the host filesystem of" in result.reason, result.reason
    assert "below its reserve of 100.0 MiB" in result.reason
    assert min(free_seen) >= reserve // 2, (min(free_seen), reserve)
    assert sha256(image) == original
    assert sorted(p.name for p in small_host.iterdir()) == ["disk.qcow2", "hog"]
    assert domain.power is DomainState.RUNNING


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_jobs_on_one_filesystem_share_its_reserve_through_the_journal(
    small_host: Path, tmp_path: Path
) -> None:
    """The second job sees what the first holds reserved; once the first is done, it fits."""
    images = [dirty_image(small_host / f"disk{i}.qcow2") for i in (1, 2)]
    domains = [
        FakeDomain([FakeDisk("vda", image, discard=False)], name=f"web-{i}",
                   filesystems=[linux_fs("/", "vda", total=974 * MIB, used=44 * MIB)])
        for i, image in enumerate(images)
    ]  # fmt: skip
    settings = JobSettings(min_gain=0, free_space=FreeSpaceMethod.NONE,
                           reserve=Reserve(host_percent=0, host_min_bytes=150 * MIB))  # fmt: skip
    state = tmp_path / "state"
    seen: list[JobResult] = []

    def job(domain: FakeDomain, before_step: Callable[[Step], None] | None = None) -> JobResult:
        return ReclaimJob(domain, QemuImg(priority=None), settings, images_of_other_domains=dict,
                          journal=Journal(state), before_step=before_step).run()  # fmt: skip

    def second_job_meanwhile(step: Step) -> None:
        if step is Step.REWRITE and not seen:
            seen.append(job(domains[1]))

    first = job(domains[0], before_step=second_job_meanwhile)
    again = job(domains[1])

    [meanwhile] = seen
    assert meanwhile.outcome is Outcome.SKIPPED, meanwhile.reason
    assert "MiB are reserved by other jobs" in meanwhile.reason, meanwhile.reason
    assert "150.0 MiB must stay free" in meanwhile.reason
    assert meanwhile.waits_for_space, "it fits once the first job is done: the daemon retries"
    assert first.outcome is Outcome.RECLAIMED, first.reason
    assert again.outcome is Outcome.RECLAIMED, again.reason
    assert Journal(state).reserved_elsewhere("nobody", os.stat(small_host).st_dev) == 0
