"""The live mode's space on the host: what it reserves, and what it does when the room goes.

What a live job may write on an image's filesystem, reserved in the journal (through
``steps.preflight``, beside the other jobs' reservations) before the snapshot:
- the rewrite's measured need, as offline;
- its overlays: overlay 1 takes every guest write from the snapshot to the copy's
  pivot, and the copy writes what overlay 1 holds into overlay 2, which then takes the
  writes until the commit's pivot; both stay until CLEANUP. The guest's write rate is
  unknown, so each overlay is bounded by a fixed allowance that grows with the disk
  (``overlay_bound``), never by a policy or a guest figure.
The old base is not counted: QEMU holds its inode open after the rename until the
copy's pivot, so its blocks are not given back before then, but they were allocated
before the job and are outside the free space every check starts from; counting them
again would only refuse jobs that fit.

What the bound cannot know (a busy guest, another writer on the filesystem) the
watch sees (``LiveWatch``, every 0.25 s from SNAPSHOT to CLEANUP):
- before SWAP, below the reserve: the convert is stopped and its file removed, the
  snapshot is committed back into the untouched base at once, and the job fails with
  the filesystem and its free bytes;
- from SWAP on the only way is forward (the base was replaced), and going forward is
  also how the room comes back (the copy's pivot releases the old base). So the job
  goes on, but a copy or a commit starts only if what it will write leaves at least
  half the reserve free (``block_job_room``); otherwise the job stops there, on a
  consistent chain of overlays, unfinished (recovery finishes it once there is room).
"""

from __future__ import annotations

import os

from virt_reclaim.image import imagefile
from virt_reclaim.job.context import JobContext
from virt_reclaim.job.freespace import budget
from virt_reclaim.job.freespace.watch import LiveWatch
from virt_reclaim.job.results import JobFailed
from virt_reclaim.units import MIB, format_bytes

# Each overlay may take this much, or OVERLAY_SHARE of the disk if more (never more than
# the disk): a guest's ordinary writes during a rewrite of minutes. A guest that writes
# more is caught by the watch, which ends the job before the host's reserve is gone.
OVERLAY_MIN_BYTES = 64 * MIB
OVERLAY_SHARE = 1 / 32


def overlay_bound(virtual_size: int) -> int:
    """What overlays 1 and 2 of a disk of ``virtual_size`` bytes are reserved, together."""
    one = min(virtual_size, max(OVERLAY_MIN_BYTES, int(virtual_size * OVERLAY_SHARE)))
    return 2 * one


def floors(job: JobContext) -> dict[int, tuple[str, int]]:
    """Per host filesystem (by device) of the job's images: a folder on it, its reserve."""
    found: dict[int, tuple[str, int]] = {}
    for disk in job.disks:
        filesystem = budget.host_filesystem(os.path.dirname(disk.path) or ".")
        reserve = job.settings.reserve.host_bytes(filesystem.size)
        found.setdefault(filesystem.device, (filesystem.folder, reserve))
    return found


def watch(job: JobContext) -> LiveWatch:
    """The watch over the job's filesystems (enter it around the live steps)."""
    return LiveWatch(floors(job), job.stop)


def raise_if_stopped(live_watch: LiveWatch) -> None:
    """Raise JobFailed when the watch saw a filesystem below its reserve."""
    if live_watch.why is not None:
        raise JobFailed(f"stopped the live job: {live_watch.why}")


def stopped(why: str) -> JobFailed:
    """The failure of a live job the watch stopped before its swap (the snapshot undone)."""
    return JobFailed(
        f"stopped the live job: {why}; the snapshot was committed back and the guest "
        "runs on its original image"
    )


def block_job_room(job: JobContext, target: str, image: str, source: str, what: str) -> None:
    """Raise JobFailed unless the ``what`` block job, writing ``source``'s data, fits now.

    The copy writes what overlay 1 holds into overlay 2, the commit what overlay 2 holds
    into the base: each is started only if half the reserve stays free after it.
    """
    folder = os.path.dirname(image) or "."
    filesystem = budget.host_filesystem(folder)
    reserve = job.settings.reserve.host_bytes(filesystem.size)
    writes = imagefile.allocated_bytes(source) if os.path.exists(source) else 0
    if filesystem.free - writes >= reserve // 2:
        return
    job.log.warning("live.block_job_refused", target=target, job=what, folder=folder,
                    free=filesystem.free, writes=writes, reserve=reserve)  # fmt: skip
    raise JobFailed(
        f"{target}: the {what} was not started: the host filesystem of {folder} has "
        f"{format_bytes(filesystem.free)} free, and the {what} would write up to "
        f"{format_bytes(writes)} with {format_bytes(reserve)} to keep free"
    )
