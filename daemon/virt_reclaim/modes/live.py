"""The live mode: recompress a running guest's disks with no downtime (live-reclaim.md).

After the shared steps (the guest's space freed while it runs):
SNAPSHOT   an external disk-only snapshot: the guest now writes into overlay 1 and
           the original image is a read-only, consistent base;
REWRITE    the base converted beside itself (it is no longer written);
VERIFY     check of the new image, compare with the base;
SWAP       the new image renamed over the base. QEMU still reads the old inode; the
           path holds the same guest-visible bytes, so the chain is consistent at
           every moment, also after a crash;
COPY       overlay 2 over the new base; a shallow block copy of overlay 1 onto it,
           READY, pivot: QEMU now reads the new base (the old inode is freed);
COMMIT     an active commit of overlay 2 into the base, READY, pivot: the guest
           runs on the original path alone, in both the live and the persistent XML;
CLEANUP    the overlays are removed.
Before SWAP a failure or a stop undoes the snapshot (commit back into the untouched
base); from SWAP on the only safe way is forward, and what cannot be finished now is
left to recovery, which finishes it from the state journaled per disk.
No quiesce: the guest always sees base + overlay, so the base needs no freeze.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, cast

from virt_reclaim import imagefile, process, qemu_img
from virt_reclaim.errors import VirtError
from virt_reclaim.jobcontext import DiskWork, JobContext, Step
from virt_reclaim.journal import JournalDisk, JournalJob
from virt_reclaim.ports import BlockJobsPort, LiveDomainPort
from virt_reclaim.results import JobFailed, JobUnfinished, Recovered
from virt_reclaim.rewrite import remove_temporary_files, rewrite_disk, swap_disk, verify_disk

READY_TIMEOUT_S = 600.0


def overlay_path(image: str, job_id: str, n: int) -> str:
    """Overlay ``n`` (1 or 2) beside ``image``: hidden and recognisable, like the temp file.

    Beside the image because QEMU must reach it: a filesystem mounted after the guest
    started is not in QEMU's mount namespace.
    """
    folder, name = os.path.split(image)
    return os.path.join(folder, f".{name}{imagefile.TEMP_MARK}{job_id}.overlay{n}")


class LiveMode:
    """Reclaim while the guest runs (see the module docstring)."""

    name = "live"

    def run(self, job: JobContext) -> None:
        """Take the live steps; undo before the swap, go forward after it."""
        domain = cast(LiveDomainPort, job.domain)
        jobs = domain.block_jobs()
        try:
            self._run(job, jobs)
        finally:
            jobs.close()

    def _run(self, job: JobContext, jobs: BlockJobsPort) -> None:
        # Inspect refused disks with a block job (livecheck); one may have started since,
        # during a free-space step of minutes. Before anything is journaled: not ours to end.
        for disk in job.disks:
            busy = jobs.active_job(disk.target)
            if busy is not None:
                raise JobFailed(f"{disk.target}: a {busy.type} block job is already running")
        for disk in job.disks:
            _record(job, disk, "planned")
        with job.step(Step.SNAPSHOT):
            jobs.snapshot_disk_only(
                {d.target: overlay_path(d.path, job.job_id, 1) for d in job.disks}, quiesce=False
            )
            for disk in job.disks:
                _record(job, disk, "snapshotted")
        try:
            with job.step(Step.REWRITE):
                for disk in job.disks:
                    # The base is read-only now: no guard needed, QEMU holds its own locks.
                    rewrite_disk(job, disk, lock=False)
            with job.step(Step.VERIFY):
                for disk in job.disks:
                    verify_disk(job, disk)
        except BaseException:
            remove_temporary_files(job)
            _undo_snapshot(job, jobs)
            raise
        try:
            with job.step(Step.SWAP):
                for disk in job.disks:
                    # Recovery tells a done rename from one never made by the temp file.
                    _record(job, disk, "swapping")
                    swap_disk(job, disk)
                    _record(job, disk, "swapped")
            _forward(job, jobs)
        except BaseException as exc:
            raise JobUnfinished(
                f"{exc}; the guest runs on a consistent chain of overlays beside its images, "
                "and 'virt-reclaim recover' (or the daemon at its start) finishes the job"
            ) from exc

    def recover(
        self, journaled: JournalJob, result: Recovered, lookup_domain: Callable[[str], Any]
    ) -> None:
        """Finish (after the swap) or undo (before it) a live job whose process died."""
        if not any(d.state for d in journaled.disks):
            result.actions.append("the snapshot was never asked for: nothing to undo")
            return
        domain = lookup_domain(journaled.domain_uuid)
        jobs = domain.block_jobs()
        try:
            for disk in journaled.disks:
                recover_disk(journaled.id, disk, jobs, result)
        finally:
            jobs.close()
        if all(d.state in ("swapped", "copied", "committed", "clean") for d in journaled.disks):
            result.outcome = "reclaimed"


def _forward(job: JobContext, jobs: BlockJobsPort) -> None:
    with job.step(Step.COPY):
        for disk in job.disks:
            _copy_onto_new_base(disk.path, overlay_path(disk.path, job.job_id, 2), disk.target,
                                jobs)  # fmt: skip
            _record(job, disk, "copied")
            job.log.info("live.pivoted", target=disk.target, to="new base")
    with job.step(Step.COMMIT):
        for disk in job.disks:
            _commit(disk.target, jobs)
            _record(job, disk, "committed")
            job.log.info("live.pivoted", target=disk.target, to=disk.path)
    with job.step(Step.CLEANUP):
        for disk in job.disks:
            _remove_overlays(disk.path, job.job_id)
            _record(job, disk, "clean")


def _undo_snapshot(job: JobContext, jobs: BlockJobsPort) -> None:
    """Commit overlay 1 back into the untouched base; the guest runs on its image again."""
    for disk in job.disks:
        try:
            _commit(disk.target, jobs)
        except VirtError as exc:
            raise JobUnfinished(
                f"{disk.target}: could not commit the snapshot back: {exc}"
            ) from exc
        _remove_overlays(disk.path, job.job_id)
        _record(job, disk, "undone")
        job.log.info("live.undone", target=disk.target)


def _copy_onto_new_base(base: str, overlay: str, target: str, jobs: BlockJobsPort) -> None:
    imagefile.remove_quietly(overlay)  # an earlier attempt's: the name carries the job's id
    try:
        new = imagefile.NewImage(overlay)
    except OSError as exc:
        raise JobFailed(f"{target}: cannot create {overlay}: {exc.strerror}") from exc
    try:
        qemu_img.create_overlay(new, backing=base)
        new.take_metadata_of(base)
        new.fsync()
        new.ensure_named()
    except BaseException:
        new.remove()
        raise
    new.close()
    jobs.copy_shallow(target, overlay)
    _pivot_when_ready(target, jobs, "copy")


def _commit(target: str, jobs: BlockJobsPort) -> None:
    jobs.commit_active(target)
    _pivot_when_ready(target, jobs, "commit")


def _pivot_when_ready(target: str, jobs: BlockJobsPort, what: str) -> None:
    if not jobs.wait_ready(target, READY_TIMEOUT_S):
        jobs.abort(target)
        raise JobFailed(f"{target}: the {what} was not ready within {READY_TIMEOUT_S:g} s")
    jobs.pivot(target)


def _remove_overlays(image: str, job_id: str) -> None:
    for n in (1, 2):
        imagefile.remove_quietly(overlay_path(image, job_id, n))


def _record(job: JobContext, disk: DiskWork, state: str) -> None:
    if job.journal is not None:
        job.journal.record_disk(job.job_id, disk.target, state=state)


def recover_disk(job_id: str, disk: JournalDisk, jobs: BlockJobsPort, result: Recovered) -> None:
    """Bring one disk of a dead live job to a clean chain on its original path."""
    overlay1, overlay2 = (overlay_path(disk.path, job_id, n) for n in (1, 2))
    _end_left_job(disk.target, jobs, result)
    source = jobs.disk_source(disk.target, live=True)
    temp_left = os.path.exists(disk.temp_path)
    # The rename is the only step that changes the base: done once "swapping" left no temp.
    swapped = disk.state in ("swapped", "copied", "committed", "clean") or (
        disk.state == "swapping" and not temp_left
    )
    if temp_left:
        killed = process.kill_qemu_img_holding(disk.temp_path)
        imagefile.remove_quietly(disk.temp_path)
        result.actions.append(f"{disk.target}: removed {disk.temp_path}" + (
            f" (killed qemu-img {killed})" if killed else ""))  # fmt: skip
    if source == overlay1:
        if not swapped:
            # Not swapped: the base is the untouched original; commit back into it.
            _commit(disk.target, jobs)
            result.actions.append(f"{disk.target}: committed the snapshot back into {disk.path}")
        else:
            _copy_onto_new_base(disk.path, overlay2, disk.target, jobs)
            _commit(disk.target, jobs)
            result.actions.append(f"{disk.target}: finished the swap onto the new image")
    elif source == overlay2:
        _commit(disk.target, jobs)
        result.actions.append(f"{disk.target}: committed overlay 2 into {disk.path}")
    elif source != disk.path:
        result.actions.append(f"{disk.target}: left as it is, on {source} (not ours)")
        return
    for path in (overlay1, overlay2):
        if imagefile.remove_quietly(path):
            result.actions.append(f"{disk.target}: removed {path}")
    _wait_for_persistent_source(disk, jobs, result)


def _end_left_job(target: str, jobs: BlockJobsPort, result: Recovered) -> None:
    """A copy or commit the dead job started: let it end where it was going."""
    running = jobs.active_job(target)
    if running is None:
        return
    if jobs.wait_ready(target, READY_TIMEOUT_S):
        jobs.pivot(target)
        result.actions.append(f"{target}: pivoted the {running.type} left running")
    else:
        jobs.abort(target)
        result.actions.append(f"{target}: aborted the {running.type} left running")


def _wait_for_persistent_source(disk: JournalDisk, jobs: BlockJobsPort, result: Recovered) -> None:
    """Libvirt writes the persistent XML back after a pivot; say so if it does not."""
    deadline = time.monotonic() + 10
    while jobs.disk_source(disk.target, live=False) not in (disk.path, None):
        if time.monotonic() > deadline:
            result.actions.append(f"{disk.target}: the persistent XML still names another image")
            return
        time.sleep(0.1)
