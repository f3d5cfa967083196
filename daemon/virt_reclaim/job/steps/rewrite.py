"""Rewrite, verify and swap one image: the mechanics every mode that rewrites shares.

The original is only read; the new image is written beside it, checked and
compared, made durable, and renamed over the original (the only way an original
is ever replaced).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from virt_reclaim.errors import QemuImgCancelled
from virt_reclaim.image import imagefile
from virt_reclaim.job.context import DiskWork, JobContext
from virt_reclaim.job.freespace import budget
from virt_reclaim.job.freespace.watch import LiveWatch, RewriteWatch
from virt_reclaim.job.results import JobFailed
from virt_reclaim.job.settings import Compression
from virt_reclaim.process import ProgressCallback


def rewrite_disk(
    job: JobContext, disk: DiskWork, *, lock: bool, outer: LiveWatch | None = None
) -> None:
    """Convert ``disk`` into its new file, made here exclusively; flush it, record its size.

    With ``lock`` the new image is locked like the original: locks belong to the inode,
    so the new image carries the guard across the rename. An ``outer`` watch (the live
    mode's, over every filesystem the job writes on) stops the rewrite as its own does.

    Raises:
        JobFailed: The new file cannot be created (something is at its name), the watch
            stopped the rewrite, or the name was taken over while qemu-img wrote.
    """
    compression = (
        None if job.settings.compression is Compression.NONE else str(job.settings.compression)
    )
    folder = os.path.dirname(disk.temp) or "."
    reserve = job.settings.reserve.host_bytes(budget.host_filesystem(folder).size)
    try:
        new = disk.new = imagefile.NewImage(disk.temp)
    except OSError as exc:
        raise JobFailed(f"{disk.target}: cannot create {disk.temp}: {exc.strerror}") from exc
    # The outer watch's stop is set when the job stops too.
    with RewriteWatch(folder, reserve, outer.stop if outer else job.stop) as watch:
        try:
            _convert(job, disk, new, compression, watch.stop)
        except QemuImgCancelled as exc:
            why = watch.why or (outer.why if outer else None)
            if why is None:
                raise  # the job is stopping: abandoned, as any cancelled step
            new.remove()
            raise JobFailed(f"{disk.target}: stopped the rewrite: {why}") from exc
    if lock:
        job.guard.lock(disk.temp)
    _ensure_ours(disk, new)
    # qemu-img convert does not flush; and st_blocks is only final after writeback.
    new.fsync()
    disk.bytes_after = new.allocated_bytes()
    job.record_disk(disk, bytes_after=disk.bytes_after)
    job.log.info("rewrite.done", target=disk.target, bytes_before=disk.bytes_before,
                 bytes_after=disk.bytes_after)  # fmt: skip


def _convert(
    job: JobContext,
    disk: DiskWork,
    new: imagefile.NewImage,
    compression: str | None,
    cancel: threading.Event,
) -> None:
    job.images.convert(
        disk.path,
        new,
        compression=compression,
        cluster_size=job.settings.cluster_size or disk.info.cluster_size,
        backing=disk.info.backing_recorded,
        backing_format=disk.info.backing_format,
        size_bytes=disk.info.virtual_size,
        on_progress=progress_parser(job.on_progress, disk.target),
        preallocation=job.settings.preallocation,
        rate_limit=job.settings.rate_limit,
        # The format the domain XML states (raw, vmdk for a conversion): never probed.
        source_format=disk.format,
        cancel=cancel,
    )


def _ensure_ours(disk: DiskWork, new: imagefile.NewImage) -> None:
    """Raise JobFailed unless the temporary name still names the file the job made."""
    if not new.is_named():
        raise JobFailed(
            f"{disk.target}: {disk.temp} was replaced while the job wrote it: the job's "
            "image is dropped and whatever is at that name is left alone"
        )


def verify_disk(job: JobContext, disk: DiskWork) -> None:
    """Check the new image and compare what it shows the guest with the original."""
    new = disk.new_image()
    job.images.check(new, size_bytes=disk.info.virtual_size)
    job.images.compare(
        disk.path, new, size_bytes=disk.info.virtual_size, first_format=disk.format,
        second_backing=disk.info.backing_filename, second_backing_format=disk.info.backing_format,
    )  # fmt: skip


def swap_disk(job: JobContext, disk: DiskWork) -> None:
    """Give the new image the original's owner, mode and labels, and rename it over it."""
    new = disk.new_image()
    new.take_metadata_of(disk.path)
    _ensure_ours(disk, new)
    imagefile.swap_in(
        new, disk.path, backup=disk.backup,
        kept=lambda path: job.keep_backup(disk, path),
    )  # fmt: skip
    disk.swapped = True
    job.log.info("swap.done", target=disk.target, path=disk.path, backup=disk.backup)


def remove_temporary_files(job: JobContext) -> None:
    """Delete the new images that were not swapped in (a failed or stopped job).

    Only a name that still names the file the job made: what replaced it is not ours.
    """
    for disk in job.disks:
        if disk.swapped or disk.new is None:
            continue
        if disk.new.remove():
            job.log.info("cleanup.removed", path=disk.temp)


def progress_parser(
    report: Callable[[str, float], None] | None, target: str
) -> ProgressCallback | None:
    """Turn qemu-img's ``-p`` output into (target, percent) calls of ``report``."""
    if report is None:
        return None

    def parse(chunk: str) -> None:
        # qemu-img -p prints "    (12.34/100%)\r"
        for piece in chunk.split("\r"):
            head = piece.strip().lstrip("(").split("/", 1)[0]
            try:
                report(target, float(head))
            except ValueError:
                continue

    return parse
