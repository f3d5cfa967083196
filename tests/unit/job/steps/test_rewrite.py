"""Rewrite, verify and swap one image (job/steps/rewrite.py) over real files and qemu-img.

The disk comes from ``inspect.inspect`` on the fake domain, shut off. What is checked is
what the guest would read afterwards, the files left at each name, and the journal.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fakes import MIB, FakeDisk, FakeDomain, make_image, sh
from virt_reclaim.errors import QemuImgError
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.context import JobContext
from virt_reclaim.job.freespace.budget import Reserve
from virt_reclaim.job.results import JobFailed
from virt_reclaim.job.settings import Compression, JobSettings
from virt_reclaim.job.steps import inspect
from virt_reclaim.job.steps.rewrite import (
    progress_parser,
    remove_temporary_files,
    rewrite_disk,
    swap_disk,
    verify_disk,
)
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import DomainState

NO_RESERVE = Reserve(host_percent=0.0, host_min_bytes=0)


def inspected(tmp_path: Path, **settings: object) -> tuple[JobContext, Path, Path]:
    """A job past inspect on a 256 MiB disk holding 32 MiB of 0xab, and a copy of it."""
    image = make_image(tmp_path / "disk.qcow2", "256M", ("write -P 0xab 0 32M",))
    reference = tmp_path / "reference.qcow2"
    shutil.copyfile(image, reference)
    domain = FakeDomain([FakeDisk("vda", image)], power=DomainState.SHUTOFF)
    journal = Journal(tmp_path / "state")
    journal.begin_job("j1", domain.name, domain.uuid, JobSettings())
    job = JobContext(
        domain=domain, images=QemuImg(), job_id="j1", images_of_other_domains=dict,
        settings=JobSettings(reserve=NO_RESERVE, **settings),  # type: ignore[arg-type]
        journal=journal,
    )  # fmt: skip
    inspect.inspect(job)
    job.disks[0].bytes_before = job.disks[0].allocated()
    return job, image, reference


def same_disk(first: Path, second: Path) -> None:
    """What a guest reads of both images is the same (qemu-img compare exits 0)."""
    sh("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", str(first), str(second))


def test_the_new_image_is_smaller_holds_the_same_disk_and_replaces_the_original(
    tmp_path: Path,
) -> None:
    job, image, reference = inspected(tmp_path, keep_backup=3600.0)
    [disk] = job.disks
    original_inode = image.stat().st_ino

    rewrite_disk(job, disk, lock=False)
    verify_disk(job, disk)
    swap_disk(job, disk)

    assert disk.swapped and not Path(disk.temp).exists()
    same_disk(image, reference)
    assert image.stat().st_ino != original_inode
    assert disk.bytes_after == image.stat().st_blocks * 512
    assert disk.bytes_before is not None and disk.bytes_after < disk.bytes_before // 4
    # The original, kept as a backup and journaled before the rename.
    assert disk.backup is not None and os.stat(disk.backup).st_ino == original_inode
    same_disk(Path(disk.backup), reference)
    assert job.journal is not None
    [backup] = job.journal.backups()
    assert (backup.path, backup.target, backup.job_id) == (disk.backup, "vda", "j1")
    [journaled] = job.journal.unfinished()[0].disks
    assert journaled.bytes_after == disk.bytes_after


def test_an_uncompressed_rewrite_keeps_every_data_cluster(tmp_path: Path) -> None:
    job, image, reference = inspected(tmp_path, compression=Compression.NONE)
    [disk] = job.disks
    rewrite_disk(job, disk, lock=False)
    verify_disk(job, disk)
    assert disk.bytes_after is not None and disk.bytes_after >= 32 * MIB
    same_disk(Path(disk.temp), reference)
    same_disk(image, reference)  # the original is only read


def test_a_file_already_at_the_temporary_name_is_refused_and_left(tmp_path: Path) -> None:
    job, image, reference = inspected(tmp_path)
    [disk] = job.disks
    Path(disk.temp).write_bytes(b"someone else's")
    with pytest.raises(JobFailed, match=f"vda: cannot create {disk.temp}: File exists"):
        rewrite_disk(job, disk, lock=False)
    assert Path(disk.temp).read_bytes() == b"someone else's"
    remove_temporary_files(job)
    assert Path(disk.temp).read_bytes() == b"someone else's"
    same_disk(image, reference)


def test_a_temporary_image_replaced_after_the_rewrite_is_never_swapped_in(tmp_path: Path) -> None:
    job, image, reference = inspected(tmp_path)
    [disk] = job.disks
    rewrite_disk(job, disk, lock=False)
    moved = Path(disk.temp + ".moved")
    os.rename(disk.temp, moved)
    Path(disk.temp).write_bytes(b"planted")

    with pytest.raises(JobFailed, match="was replaced while the job wrote it"):
        swap_disk(job, disk)
    remove_temporary_files(job)

    assert not disk.swapped
    same_disk(image, reference)
    assert Path(disk.temp).read_bytes() == b"planted"  # not ours: left alone
    assert moved.exists()


def test_a_new_image_that_differs_fails_the_verify_and_is_removed(tmp_path: Path) -> None:
    job, image, reference = inspected(tmp_path)
    [disk] = job.disks
    rewrite_disk(job, disk, lock=False)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0xcd 4M 64k", disk.temp)

    with pytest.raises(QemuImgError):
        verify_disk(job, disk)
    remove_temporary_files(job)

    assert not Path(disk.temp).exists()
    same_disk(image, reference)


@pytest.mark.parametrize(
    ("chunks", "reported"),
    [
        (["    (0.00/100%)\r"], [0.0]),
        (["    (12.34/100%)\r    (25.00/100%)\r"], [12.34, 25.0]),
        (["    (100.00/100%)\n"], [100.0]),
        (["", "\r", "qemu-img: warning\r"], []),
    ],
    ids=["start", "two-in-one-read", "end", "not-progress"],
)
def test_qemu_img_progress_is_reported_per_disk(chunks: list[str], reported: list[float]) -> None:
    heard: list[tuple[str, float]] = []
    parse = progress_parser(lambda target, percent: heard.append((target, percent)), "vdb")
    assert parse is not None
    for chunk in chunks:
        parse(chunk)
    assert heard == [("vdb", percent) for percent in reported]
    assert progress_parser(None, "vdb") is None
