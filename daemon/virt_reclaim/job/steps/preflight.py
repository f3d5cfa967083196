"""The preflight: whether the job can write beside each image and keep each host's reserve.

A temporary file is created and removed beside each image once per job, in the
PREFLIGHT step (a read-only folder is found while the guest still runs; the rewrite
itself creates its file exclusively and never through a link). The room on the host
is checked again wherever the host may have changed since (``check_room``): after
the free-space step (the fill may have grown the image, another guest taken the
room) and right before the rewrite, once the guest is down.

What the rewrite may write is ``qemu-img measure`` of the image, measured once and
measured again only when the image file changed since (``rewrite_need``).
"""

from __future__ import annotations

import os

from virt_reclaim.image import imagefile
from virt_reclaim.job.context import DiskWork, JobContext, Measured
from virt_reclaim.job.freespace import budget
from virt_reclaim.job.modes import livespace
from virt_reclaim.job.results import JobSkipped, SpaceTaken
from virt_reclaim.units import MIB, format_bytes


def preflight(job: JobContext) -> None:
    """Skip the job unless it can write beside each image and keep each host's reserve.

    Each folder is probed (``imagefile.probe_create``), then the room checked
    (``check_room``).
    """
    for disk in job.disks:
        folder = os.path.dirname(disk.temp) or "."
        if problem := imagefile.folder_problem(folder) or imagefile.probe_create(disk.temp):
            raise JobSkipped(f"{disk.target}: {problem}")
    check_room(job)


def check_room(job: JobContext) -> None:
    """Skip the job unless each host filesystem keeps its reserve after the rewrites.

    The rewrites of every disk on one filesystem (by device: two folders on it share
    its free space) add up, with a margin; what is left free must stay above the
    filesystem's reserve (``free_space.host_reserve``), or the guests writing there
    would pause when it fills. The need is reserved in the journal, beside what the
    other jobs on the host hold reserved there (counted whole: part of it may be
    written already, so the bound errs on the safe side). A live job reserves its
    overlays too (``modes.livespace``). The free space is read anew at each call.
    """
    need_by_device: dict[int, tuple[budget.HostFilesystem, int]] = {}
    for disk in job.disks:
        filesystem = budget.host_filesystem(os.path.dirname(disk.path) or ".")
        _, image_bytes = need_by_device.get(filesystem.device, (filesystem, 0))
        need = rewrite_need(job, disk)
        if job.live:
            need += livespace.overlay_bound(disk.info.virtual_size)
        need_by_device[filesystem.device] = (filesystem, image_bytes + need)
    what = "the rewrite and its overlays need" if job.live else "the rewrite needs"
    for filesystem, image_bytes in need_by_device.values():
        need = image_bytes + max(budget.REWRITE_MARGIN, image_bytes // 50)
        reserve = job.settings.reserve.host_bytes(filesystem.size)

        def fits(
            others: int,
            fs: budget.HostFilesystem = filesystem,
            need: int = need,
            reserve: int = reserve,
        ) -> str | None:
            job.log.info("preflight.space", folder=fs.folder, need=need, have=fs.free,
                         reserve=reserve, reserved_by_others=others)  # fmt: skip
            if fs.free - others - need >= reserve:
                return None
            held = f", {format_bytes(others)} are reserved by other jobs" if others else ""
            return (
                f"not enough free space on the filesystem of {fs.folder}: {what} "
                f"up to {format_bytes(need)}, {format_bytes(fs.free)} are free{held} and "
                f"{format_bytes(reserve)} must stay free (free_space.host_reserve)"
            )

        if job.journal is None:
            problem = fits(0)
        elif job.settings.dry_run:  # an estimate: it looks, it reserves nothing
            problem = fits(job.journal.reserved_elsewhere(job.job_id, filesystem.device))
        else:
            problem = job.journal.reserve(
                job.job_id, filesystem.device, filesystem.folder, need, fits
            )
        if problem is not None:
            if fits(0) is None:  # it fits alone: the other jobs' reservations are in the way
                raise SpaceTaken(problem)
            raise JobSkipped(problem)


def rewrite_need(job: JobContext, disk: DiskWork) -> int:
    """The most the rewrite of ``disk`` may write (``qemu-img measure``)."""
    if disk.info.backing_filename:
        # Only the top layer is rewritten; it cannot outgrow what it holds now.
        return imagefile.allocated_bytes(disk.path) + MIB
    measured = _measure(job, disk)
    if disk.zeroed_bytes and disk.rewrite_need:
        # measure counts the clusters our fill allocated, but convert writes no zero
        # clusters: they add nothing to what the rewrite needs.
        return max(disk.rewrite_need, measured - disk.zeroed_bytes)
    return measured


def _measure(job: JobContext, disk: DiskWork) -> int:
    """``qemu-img measure`` of the image, again only if its file changed since the last one.

    Any write to the image (the guest's, a zero-fill's, a start someone made) changes
    its modification time, size or blocks; the stamp is taken before measuring, so a
    write during the measure makes the next call measure again.
    """
    stamp = _stamp(disk)
    if disk.measured is not None and disk.measured.stamp == stamp:
        return disk.measured.bytes
    measured = job.images.measure(disk.path, force_share=job.was_running, image_format=disk.format)
    disk.measured = Measured(stamp, measured)
    return measured


def _stamp(disk: DiskWork) -> tuple[int, ...]:
    """What changes when the image (and a flat VMDK's extent) is written."""
    stamp: tuple[int, ...] = ()
    for path in (disk.path, disk.data_file):
        if path:
            st = os.stat(path)
            stamp += (st.st_ino, st.st_size, st.st_blocks, st.st_mtime_ns, st.st_ctime_ns)
    return stamp
