"""BlockJobs on real guests: the live reclaim sequence (README.md, "Live mode"), by hand.

A witness on its own libvirt connection records the domain's lifecycle and block job
events and polls its state; a loop in the guest keeps writing (and fsyncing) files while
the jobs run. What matters: the guest never pauses or stops, it ends on its original
image in the live and the persistent XML, and every file, also those written during the
jobs, has the same checksum in the image once the guest is shut down.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from testbed import data
from testbed.content import Content
from testbed.guests import URI, Guest
from testbed.live import guest_writing, witnessed
from testbed.reclaim import image_info, qemu_img_check_clean
from virt_reclaim.errors import BlockJobFailed, NoBlockJob, VirtError
from virt_reclaim.virt.blockjobs import BlockJobs
from virt_reclaim.virt.connection import Hypervisor

pytestmark = pytest.mark.guest

MIB = 1024 * 1024
READY_TIMEOUT_S = 120.0


class Steps:
    """Wall-clock duration of each named step, printed at the end (run pytest with -s)."""

    def __init__(self) -> None:
        self.durations: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        yield
        self.durations[name] = time.monotonic() - start

    def report(self, title: str) -> None:
        parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.durations.items())
        print(f"\n{title}: {parts}")


def qemu_img(*args: str, timeout: float = 300) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True,
                          timeout=timeout).stdout  # fmt: skip


def create_overlay(path: Path, backing: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "qcow2", str(path))


def recompress_in_place(original: Path, tmp: Path) -> None:
    """The rewrite step: convert the read-only base, compare, fsync, rename over it."""
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd",
             str(original), str(tmp))  # fmt: skip
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(original), str(tmp))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, original)
    folder = os.open(original.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def assert_on_original(jobs: BlockJobs, guest: Guest) -> None:
    assert jobs.disk_source("vda", live=True) == str(guest.data_image)
    assert jobs.disk_source("vda", live=False) == str(guest.data_image)
    assert jobs.active_job("vda") is None
    live = guest.dom.XMLDesc(0)
    assert "<mirror" not in live
    # A single image again: its backing store is the empty end marker.
    assert "overlay" not in live, live


def assert_same_once_off(guest: Guest, sums: dict[str, str]) -> None:
    """Shut down, the image holds every file as the guest read it, and only the image is named."""
    assert guest.files_once_off() == sums
    qemu_img("check", str(guest.data_image))  # without -U: nothing may hold the image now
    qemu_img_check_clean(guest.data_image)
    assert guest.dom.XMLDesc(0).count(str(guest.data_image)) == 1


def test_live_recompression_ends_on_the_original_image(make_guest: Callable[..., Guest]) -> None:
    """The whole live sequence by hand, a writer in the guest; the files read from the image."""
    files = Content(text={"app.log": 64}, random={"blob.bin": 8})
    guest = make_guest(data_size="512M", discard=True, content=files)
    before = guest.content_sums
    original = guest.data_image
    overlay1 = original.with_name("data.overlay1.qcow2")
    overlay2 = original.with_name("data.overlay2.qcow2")
    tmp = original.with_name("data.recompressed.qcow2")
    bytes_before = allocated(original)
    steps = Steps()

    with (
        Hypervisor(URI) as hypervisor,
        BlockJobs(hypervisor.domain(guest.name)) as jobs,
        witnessed(guest) as witness,
        guest_writing(guest) as writer,
    ):
        writer.wait_for_files(3)

        with steps("snapshot"):
            jobs.snapshot_disk_only({"vda": str(overlay1)}, quiesce=True, reuse_existing=False)
        assert jobs.disk_source("vda", live=True) == str(overlay1)
        assert jobs.disk_source("vda", live=False) == str(overlay1)
        writer.wait_for_files(writer.files() + 2)  # into overlay1

        with steps("convert+compare+rename"):
            recompress_in_place(original, tmp)

        with steps("copy+pivot"):
            create_overlay(overlay2, original)
            jobs.copy_shallow("vda", str(overlay2))
            assert jobs.wait_ready("vda", READY_TIMEOUT_S)
            jobs.pivot("vda")
        assert jobs.disk_source("vda", live=True) == str(overlay2)
        assert jobs.active_job("vda") is None
        writer.wait_for_files(writer.files() + 2)  # into overlay2

        with steps("commit+pivot"):
            jobs.commit_active("vda")
            assert jobs.wait_ready("vda", READY_TIMEOUT_S)
            jobs.pivot("vda")

        assert_on_original(jobs, guest)
        overlay1.unlink()
        overlay2.unlink()
        writer.wait_for_files(writer.files() + 2)  # into the original again
        written = writer.stop()
        witness.assert_never_left_running()
        witness.wait_for_status("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT,
                                "completed", timeout=10)  # fmt: skip
        events = list(witness.block_jobs)

    steps.report(f"live sequence ({written} files written meanwhile; block job events {events})")
    print(f"image: {bytes_before / MIB:.1f} MiB allocated before, "
          f"{allocated(original) / MIB:.1f} MiB after")  # fmt: skip
    assert image_info(original)["format-specific"]["data"]["compression-type"] == "zstd"
    assert "backing-filename" not in image_info(original)
    assert not tmp.exists()
    sums = data.checksums(guest)
    assert before.items() <= sums.items()
    assert len(sums) == len(before) + written
    assert_same_once_off(guest, sums)


def test_aborted_copy_stays_on_the_snapshot_and_commits_back(
    make_guest: Callable[..., Guest],
) -> None:
    guest = make_guest(data_size="256M", discard=True, content=Content(text={"app.log": 8}))
    original = guest.data_image
    overlay1 = original.with_name("data.overlay1.qcow2")
    overlay2 = original.with_name("data.overlay2.qcow2")

    with (
        Hypervisor(URI) as hypervisor,
        BlockJobs(hypervisor.domain(guest.name)) as jobs,
        witnessed(guest) as witness,
        guest_writing(guest) as writer,
    ):
        jobs.snapshot_disk_only({"vda": str(overlay1)}, quiesce=False, reuse_existing=False)
        data.write_random(guest, "/data/after-snapshot.bin", 4)
        create_overlay(overlay2, original)

        jobs.copy_shallow("vda", str(overlay2))
        assert jobs.wait_ready("vda", READY_TIMEOUT_S)
        jobs.abort("vda")

        assert jobs.active_job("vda") is None
        assert jobs.disk_source("vda", live=True) == str(overlay1)
        assert jobs.disk_source("vda", live=False) == str(overlay1)
        assert str(overlay2) not in guest.dom.XMLDesc(0)
        overlay2.unlink()
        data.write_random(guest, "/data/after-abort.bin", 2)

        jobs.commit_active("vda")
        assert jobs.wait_ready("vda", READY_TIMEOUT_S)
        jobs.pivot("vda")

        assert_on_original(jobs, guest)
        overlay1.unlink()
        writer.stop()
        witness.assert_never_left_running()
        copy_events = witness.statuses("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY)

    print(f"\nblock job events of the aborted copy: {copy_events}")
    assert copy_events[0] == "ready"
    sums = data.checksums(guest)
    assert {"/data/app.log", "/data/after-snapshot.bin", "/data/after-abort.bin"} <= set(sums)
    assert_same_once_off(guest, sums)


def wait_until_complete(guest: Guest, disk: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll the job with the test bed's own connection until cur == end."""
    deadline = time.monotonic() + timeout
    while True:
        info = guest.dom.blockJobInfo(disk, 0)
        if info and info["end"] > 0 and info["cur"] == info["end"]:
            return
        assert time.monotonic() < deadline, f"the job on {disk} is not complete: {info}"
        time.sleep(0.1)


def test_commit_of_an_overlay_disk_leaves_its_backing_file_alone(
    make_guest: Callable[..., Guest],
) -> None:
    """SHALLOW: the commit goes into the image right below the snapshot, not the bottom.

    Also: a wait that starts after the READY event fired still sees the job ready.
    """
    guest = make_guest(data_size="128M", backing=True, discard=True)
    assert guest.backing_image is not None
    data.write_random(guest, "/data/blob.bin", 2)
    base_before = subprocess.run(["sha256sum", str(guest.backing_image)], check=True,
                                 capture_output=True, text=True).stdout  # fmt: skip
    overlay1 = guest.data_image.with_name("data.overlay1.qcow2")

    with Hypervisor(URI) as hypervisor, BlockJobs(hypervisor.domain(guest.name)) as jobs:
        jobs.snapshot_disk_only({"vda": str(overlay1)}, quiesce=False, reuse_existing=False)
        data.write_random(guest, "/data/after-snapshot.bin", 2)
        jobs.commit_active("vda")
        wait_until_complete(guest, "vda")
        # Its READY event fired before this one listened: only the polling can see it.
        with BlockJobs(hypervisor.domain(guest.name)) as late:
            start = time.monotonic()
            assert late.wait_ready("vda", READY_TIMEOUT_S)
            # Seconds (a poll every BLOCK_JOB_POLL_S, on a loaded host), not READY_TIMEOUT_S.
            assert time.monotonic() - start < 10
            late.pivot("vda")
        assert jobs.disk_source("vda", live=True) == str(guest.data_image)
        assert jobs.active_job("vda") is None
        overlay1.unlink()

    base_after = subprocess.run(["sha256sum", str(guest.backing_image)], check=True,
                                capture_output=True, text=True).stdout  # fmt: skip
    assert base_after == base_before
    assert image_info(guest.data_image)["backing-filename"] == str(guest.backing_image)
    assert_same_once_off(guest, data.checksums(guest))


def test_waits_and_ends_without_a_job_fail_at_once_and_say_so(
    make_guest: Callable[..., Guest],
) -> None:
    """Design: waiting on a disk with no job raises NoBlockJob at once, not after the timeout."""
    guest = make_guest(data_size="64M")
    name = guest.name

    with Hypervisor(URI) as hypervisor, BlockJobs(hypervisor.domain(name)) as jobs:
        start = time.monotonic()
        with pytest.raises(NoBlockJob, match=f"^{name}: no block job on disk vda to wait for$"):
            jobs.wait_ready("vda", 0.01)
        with pytest.raises(NoBlockJob, match=f"^{name}: no block job on disk vda to wait for$"):
            jobs.wait_ready("vda", 600)
        assert time.monotonic() - start < 5
        with pytest.raises(NoBlockJob, match=f"^{name}: no block job on disk vda to pivot$"):
            jobs.pivot("vda")
        with pytest.raises(NoBlockJob, match=f"^{name}: no block job on disk vda to abort$"):
            jobs.abort("vda")
        with pytest.raises(VirtError, match=f"^{name}: cannot read the block job of disk vdz: "):
            jobs.wait_ready("vdz", 0.01)
        with pytest.raises(VirtError, match=f"^{name}: cannot snapshot vdz onto /x: no disk"):
            jobs.snapshot_disk_only({"vdz": "/x"}, quiesce=False, reuse_existing=False)
        with pytest.raises(
            VirtError, match=f"^{name}: cannot start an active block commit of disk vda: "
        ):
            jobs.commit_active("vda")  # a single image: nothing to commit into
        assert jobs.active_job("vda") is None
        assert jobs.disk_source("vda", live=True) == str(guest.data_image)
        assert jobs.disk_source("vdz", live=True) is None
    assert guest.is_running()


# A process whose connection was opened without libvirt's event loop: no events at all.
WITHOUT_EVENTS = """
import sys, libvirt
from virt_reclaim.virt.blockjobs import BlockJobs
from virt_reclaim.virt.domain import Domain
uri, name, overlay = sys.argv[1:]
conn = libvirt.open(uri)
with BlockJobs(Domain(conn.lookupByName(name))) as jobs:
    jobs.snapshot_disk_only({"vda": overlay}, quiesce=False, reuse_existing=False)
    jobs.commit_active("vda")
    ready = jobs.wait_ready("vda", 60)
    jobs.pivot("vda")
    print("RESULT", ready, jobs.active_job("vda"), jobs.disk_source("vda", live=True))
"""


def test_without_an_event_loop_the_waits_poll(make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(data_size="64M")
    overlay1 = guest.data_image.with_name("data.overlay1.qcow2")

    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_EVENTS, URI, guest.name, str(overlay1)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert proc.returncode == 0, proc.stderr
    assert "block_jobs.no_events" in proc.stdout + proc.stderr
    assert f"RESULT True None {guest.data_image}" in proc.stdout, proc.stdout
    overlay1.unlink()
    assert guest.is_running()


def test_a_job_that_is_not_ready_in_time_is_false_then_aborted(
    make_guest: Callable[..., Guest],
) -> None:
    """A copy started elsewhere (as after a restart of ours) and throttled: not ready in time."""
    guest = make_guest(data_size="128M")
    overlay1 = guest.data_image.with_name("data.overlay1.qcow2")
    overlay2 = guest.data_image.with_name("data.overlay2.qcow2")

    with Hypervisor(URI) as hypervisor, BlockJobs(hypervisor.domain(guest.name)) as jobs:
        jobs.snapshot_disk_only({"vda": str(overlay1)}, quiesce=False, reuse_existing=False)
        data.write_random(guest, "/data/after-snapshot.bin", 4)
        create_overlay(overlay2, guest.data_image)
        destination = f"<disk type='file'><driver type='qcow2'/><source file='{overlay2}'/></disk>"
        flags = (libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
                 | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)  # fmt: skip
        guest.dom.blockCopy(
            "vda", destination, {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: 64 * 1024}, flags
        )

        start = time.monotonic()
        assert jobs.wait_ready("vda", 1.0) is False
        # Its own timeout, give or take a loaded host's scheduling.
        assert 1.0 <= time.monotonic() - start < 10
        job = jobs.active_job("vda")
        assert job is not None
        assert (job.type, job.bandwidth) == ("copy", 64 * 1024)
        assert not job.complete
        with pytest.raises(VirtError, match="cannot pivot the block job of disk vda"):
            jobs.pivot("vda")  # not ready
        jobs.abort("vda")
        assert jobs.active_job("vda") is None
        assert jobs.disk_source("vda", live=True) == str(overlay1)

        jobs.commit_active("vda")
        assert jobs.wait_ready("vda", READY_TIMEOUT_S)
        jobs.pivot("vda")
        assert_on_original(jobs, guest)
        overlay1.unlink()
        overlay2.unlink()
    assert_same_once_off(guest, data.checksums(guest))


def test_a_copy_that_fails_raises_block_job_failed(
    make_guest: Callable[..., Guest], make_tmpfs: Callable[[str], Path]
) -> None:
    """A destination on a full filesystem: QEMU fails the mirror, wait_ready says so."""
    # Mounted before the guest starts: QEMU runs in a mount namespace of its own.
    small = make_tmpfs("1M")
    guest = make_guest(data_size="128M")
    overlay1 = guest.data_image.with_name("data.overlay1.qcow2")
    overlay2 = small / "data.overlay2.qcow2"

    with (
        Hypervisor(URI) as hypervisor,
        BlockJobs(hypervisor.domain(guest.name)) as jobs,
        witnessed(guest) as witness,
    ):
        jobs.snapshot_disk_only({"vda": str(overlay1)}, quiesce=False, reuse_existing=False)
        data.write_random(guest, "/data/after-snapshot.bin", 8)
        create_overlay(overlay2, guest.data_image)

        jobs.copy_shallow("vda", str(overlay2))
        with pytest.raises(BlockJobFailed, match=f"^{guest.name}: the copy job on disk vda failed"):
            jobs.wait_ready("vda", READY_TIMEOUT_S)
        assert jobs.active_job("vda") is None
        assert jobs.disk_source("vda", live=True) == str(overlay1)
        witness.assert_never_left_running()

        jobs.commit_active("vda")
        assert jobs.wait_ready("vda", READY_TIMEOUT_S)
        jobs.pivot("vda")
        assert_on_original(jobs, guest)
        overlay1.unlink()
    assert_same_once_off(guest, data.checksums(guest))
