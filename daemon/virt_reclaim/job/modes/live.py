"""The live mode: recompress a running guest's disks with no downtime (README.md, "Live mode").

After the shared steps (the guest's space freed while it runs):
SNAPSHOT   overlay 1 created by the job (exclusively, never through a link), then an
           external disk-only snapshot onto it (REUSE_EXT): the guest now writes
           into overlay 1 and the original image is a read-only, consistent base;
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
left to recovery, which finishes it from the state journaled per disk. What the job
reserves on the host and what it does when the room goes: ``livespace``.
No quiesce: the guest always sees base + overlay, so the base needs no freeze.
"""

from __future__ import annotations

import os
import time
from typing import cast

from virt_reclaim import process
from virt_reclaim.errors import NoBlockJob, VirtError
from virt_reclaim.image import imagefile
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.context import DiskWork, JobContext, Step
from virt_reclaim.job.freespace.watch import LiveWatch
from virt_reclaim.job.modes import livespace, overlays
from virt_reclaim.job.ports import BlockJobsPort, DomainLookup, ImagePort, LiveDomainPort
from virt_reclaim.job.results import DiskFound, JobFailed, JobUnfinished, Recovered, RecoveryOutcome
from virt_reclaim.job.settings import ModeName
from virt_reclaim.job.steps.rewrite import (
    remove_temporary_files,
    rewrite_disk,
    swap_disk,
    verify_disk,
)
from virt_reclaim.journal.records import DiskState, JournalDisk, JournalJob

READY_TIMEOUT_S = 600.0


class LiveMode:
    """Reclaim while the guest runs (see the module docstring)."""

    name = ModeName.LIVE
    stops_the_guest = False

    def __init__(self, images: ImagePort | None = None) -> None:
        """``images`` makes recovery's overlays (a job uses its own ``JobContext.images``)."""
        self.images: ImagePort = images or QemuImg()

    def run(self, job: JobContext) -> None:
        """Take the live steps; undo before the swap, go forward after it."""
        domain = cast(LiveDomainPort, job.domain)
        jobs = domain.block_jobs()
        # Target: the overlays this job made for the disk, open until removed.
        made: dict[str, list[imagefile.NewImage]] = {}
        try:
            self._run(job, jobs, made)
        finally:
            jobs.close()
            for opened in made.values():
                overlays.close_overlays(opened)

    def _run(
        self, job: JobContext, jobs: BlockJobsPort, made: dict[str, list[imagefile.NewImage]]
    ) -> None:
        # Inspect refused disks with a block job (livecheck); one may have started since,
        # during a free-space step of minutes. Before anything is journaled: not ours to end.
        for disk in job.disks:
            busy = jobs.active_job(disk.target)
            if busy is not None:
                raise JobFailed(f"{disk.target}: a {busy.type} block job is already running")
        for disk in job.disks:
            _record(job, disk, DiskState.PLANNED)
        # Watched from the snapshot to the cleanup: see livespace for what a trip does.
        with livespace.watch(job) as watch:
            self._watched(job, jobs, watch, made)

    def _watched(
        self,
        job: JobContext,
        jobs: BlockJobsPort,
        watch: LiveWatch,
        made: dict[str, list[imagefile.NewImage]],
    ) -> None:
        with job.step(Step.SNAPSHOT):
            for target, overlay in overlays.take_snapshot(job, jobs).items():
                made[target] = [overlay]
            for disk in job.disks:
                _record(job, disk, DiskState.SNAPSHOTTED)
        try:
            with job.step(Step.REWRITE):
                for disk in job.disks:
                    livespace.raise_if_stopped(watch)
                    # The base is read-only now: no guard needed, QEMU holds its own locks.
                    rewrite_disk(job, disk, lock=False, outer=watch)
            with job.step(Step.VERIFY):
                for disk in job.disks:
                    livespace.raise_if_stopped(watch)
                    verify_disk(job, disk)
            livespace.raise_if_stopped(watch)
        except BaseException as exc:
            remove_temporary_files(job)
            _undo_snapshot(job, jobs, made)
            if watch.why is not None:
                raise livespace.stopped(watch.why) from exc
            raise
        try:
            with job.step(Step.SWAP):
                for disk in job.disks:
                    # Recovery tells a done rename from one never made by the temp file.
                    _record(job, disk, DiskState.SWAPPING)
                    swap_disk(job, disk)
                    _record(job, disk, DiskState.SWAPPED)
            _forward(job, jobs, made)
        except BaseException as exc:
            raise JobUnfinished(
                f"{exc}; the guest runs on a consistent chain of overlays beside its images, "
                "and 'virt-reclaim recover' (or the daemon at its start) finishes the job"
            ) from exc

    def after_restore(self, job: JobContext) -> None:
        """Nothing waits: the guest never stopped."""

    def recover(
        self, journaled: JournalJob, result: Recovered, lookup_domain: DomainLookup
    ) -> None:
        """Finish (after the swap) or undo (before it) a live job whose process died."""
        if not any(d.state for d in journaled.disks):
            result.actions.append("the snapshot was never asked for: nothing to undo")
            return
        domain = cast(LiveDomainPort, lookup_domain(journaled.domain_uuid))
        jobs = domain.block_jobs()
        try:
            on_new = [recover_disk(journaled.id, disk, jobs, result, self.images)
                      for disk in journaled.disks]  # fmt: skip
        finally:
            jobs.close()
        if all(on_new):
            result.outcome = RecoveryOutcome.RECLAIMED


def _forward(
    job: JobContext, jobs: BlockJobsPort, made: dict[str, list[imagefile.NewImage]]
) -> None:
    with job.step(Step.COPY):
        for disk in job.disks:
            overlay1 = overlays.overlay_path(disk.path, job.job_id, 1)
            livespace.block_job_room(job, disk.target, disk.path, overlay1, "copy")
            overlay2 = overlays.overlay_path(disk.path, job.job_id, 2)
            made[disk.target].append(
                _copy_onto_new_base(job.images, disk.path, overlay2, disk.target, jobs)
            )
            _record(job, disk, DiskState.COPIED)
            job.log.info("live.pivoted", target=disk.target, to="new base")
    with job.step(Step.COMMIT):
        for disk in job.disks:
            overlay2 = overlays.overlay_path(disk.path, job.job_id, 2)
            livespace.block_job_room(job, disk.target, disk.path, overlay2, "commit")
            _commit(disk.target, disk.path, jobs)
            _record(job, disk, DiskState.COMMITTED)
            job.log.info("live.pivoted", target=disk.target, to=disk.path)
    with job.step(Step.CLEANUP):
        for disk in job.disks:
            overlays.remove_overlays(made[disk.target])
            _record(job, disk, DiskState.CLEAN)


def _undo_snapshot(
    job: JobContext, jobs: BlockJobsPort, made: dict[str, list[imagefile.NewImage]]
) -> None:
    """Commit overlay 1 back into the untouched base; the guest runs on its image again."""
    for disk in job.disks:
        try:
            _commit(disk.target, disk.path, jobs)
        except VirtError as exc:
            raise JobUnfinished(
                f"{disk.target}: could not commit the snapshot back: {exc}"
            ) from exc
        overlays.remove_overlays(made[disk.target])
        _record(job, disk, DiskState.UNDONE)
        job.log.info("live.undone", target=disk.target)


def _copy_onto_new_base(
    images: ImagePort, base: str, overlay: str, target: str, jobs: BlockJobsPort
) -> imagefile.NewImage:
    """Overlay 2 over the new base (a qcow2 the job wrote), the guest's top copied onto it.

    Created exclusively: anything already at its name is refused (recovery clears a dead
    attempt's own file first, see ``overlays.clear_dead_overlay``).
    """
    new = overlays.new_overlay(images, overlay, base, "qcow2", target)
    jobs.copy_shallow(target, overlay)
    _pivot_when_ready(target, jobs, "copy", overlay)
    return new


def _commit(target: str, into: str, jobs: BlockJobsPort) -> None:
    jobs.commit_active(target)
    _pivot_when_ready(target, jobs, "commit", into)


def _pivot_when_ready(target: str, jobs: BlockJobsPort, what: str, top: str) -> None:
    """Pivot once ready, then read the chain back: a pivot libvirt accepted may not take.

    Raises:
        JobFailed: The job was not ready in time (it is aborted).
        VirtError: After the pivot the disk does not run on ``top``.
    """
    if not jobs.wait_ready(target, READY_TIMEOUT_S):
        jobs.abort(target)
        raise JobFailed(f"{target}: the {what} was not ready within {READY_TIMEOUT_S:g} s")
    jobs.pivot(target)
    now = jobs.disk_source(target, live=True)
    if now != top:
        raise VirtError(
            f"{target}: after the pivot of the {what} the disk runs on {now}, not {top}; "
            f"every file is left in place (see 'virsh domblklist' and 'virsh blockjob')"
        )


def _record(job: JobContext, disk: DiskWork, state: DiskState) -> None:
    if job.journal is not None:
        job.journal.record_disk(job.job_id, disk.target, state=state)


def recover_disk(
    job_id: str, disk: JournalDisk, jobs: BlockJobsPort, result: Recovered, images: ImagePort
) -> bool:
    """Bring one disk of a dead live job to a clean chain on its original path.

    What is done follows what is seen (both definitions, the block job, the files and
    which file QEMU reads), not the journaled step alone: a kill can land in the middle
    of any step. A block job left running is ended where it was going and waited for;
    the chain is then finished (the new image was renamed over the base) or undone
    (it was not); the result is read back; only then are the job's files removed, and
    never one a definition names or a process holds open.

    Returns:
        True when the disk ends on its new image, False when on the original.

    Raises:
        VirtError: The chain could not be brought back to the image alone (a pivot
            refused or not taken): every file is left in place, and the message says
            what an operator can run.
    """
    ours = _our_files(disk, job_id)
    found = _observe(disk, jobs, ours)
    result.found.append(found)
    if found.block_job is not None:
        _end_left_job(disk.target, jobs, result)
        found = _observe(disk, jobs, ours)
    if os.path.exists(disk.temp_path):
        killed = process.kill_qemu_img_holding(disk.temp_path)
        if killed:
            result.actions.append(f"{disk.target}: killed qemu-img {killed} still using "
                                  f"{disk.temp_path}")  # fmt: skip
    overlay1, overlay2 = ours[1], ours[2]
    chain = found.live_chain
    # At the start, a chain of the image alone is either untouched or already committed.
    on_new = _journal_says_swapped(disk)
    if chain == (overlay1, disk.path):
        if not found.swapped:
            # The base is the untouched original: undo.
            _commit(disk.target, disk.path, jobs)
            on_new = False
            result.actions.append(f"{disk.target}: committed the snapshot back into {disk.path}")
        elif disk.state in _REWRITE_VERIFIED:
            # Recovery finds its files by their journaled names: it needs no record.
            overlays.clear_dead_overlay(overlay2, overlays.named_by(disk, jobs))
            _copy_onto_new_base(images, disk.path, overlay2, disk.target, jobs).close()
            _commit(disk.target, disk.path, jobs)
            on_new = True
            result.actions.append(f"{disk.target}: finished the swap onto the new image")
        else:
            raise VirtError(
                f"{disk.target}: {disk.path} is no longer the file the guest reads, but the "
                f"job never got to swap it (state {disk.state}): left as it is"
            )
    elif chain == (overlay2, disk.path):
        _commit(disk.target, disk.path, jobs)
        on_new = True
        result.actions.append(f"{disk.target}: committed overlay 2 into {disk.path}")
    elif chain != (disk.path,):
        result.actions.append(f"{disk.target}: left as it is, on {' -> '.join(map(str, chain))} "
                              "(not a chain this job made)")  # fmt: skip
        return False
    _wait_for_persistent(disk, jobs, result)
    named = overlays.named_by(disk, jobs)
    for path in ours:
        if overlays.remove_unused(path, named):
            result.actions.append(f"{disk.target}: removed {path}")
    return on_new


# The journaled states at which the new image was checked and compared: only then may
# the chain go forward onto it.
_REWRITE_VERIFIED = frozenset(
    {DiskState.SWAPPING, DiskState.SWAPPED, DiskState.COPIED, DiskState.COMMITTED, DiskState.CLEAN}
)
# How long libvirt may take to write the persistent definition back after a pivot.
PERSISTENT_TIMEOUT_S = 10.0


def _our_files(disk: JournalDisk, job_id: str) -> tuple[str, str, str]:
    """The temporary image and overlays 1 and 2 the job made (or would have) beside the image."""
    return (
        disk.temp_path,
        overlays.overlay_path(disk.path, job_id, 1),
        overlays.overlay_path(disk.path, job_id, 2),
    )


def _observe(disk: JournalDisk, jobs: BlockJobsPort, ours: tuple[str, ...]) -> DiskFound:
    live = jobs.disk_chain(disk.target, live=True)
    running = jobs.active_job(disk.target)
    return DiskFound(
        target=disk.target,
        live_chain=live,
        persistent_chain=jobs.disk_chain(disk.target, live=False),
        block_job=running.type if running is not None else None,
        files=tuple(p for p in ours if os.path.lexists(p)),
        swapped=_swapped(disk) if disk.path in live else None,
    )


def _swapped(disk: JournalDisk) -> bool:
    """Whether the image's path now holds another file than the one QEMU reads through it.

    QEMU keeps its images open: while the original is in the chain, a QEMU holds the
    very file at the path; once the new image was renamed over it, none does. Where
    QEMU's processes cannot be seen (the service's ProtectProc=invisible hides other
    users' processes), the journal decides: the rename came once "swapping" was
    recorded and the temporary image is gone.
    """
    if any(comm.startswith(_QEMU) for _, comm in process.holders_of(disk.path)):
        return False
    if process.any_named(_QEMU):
        return True
    return _journal_says_swapped(disk)


def _journal_says_swapped(disk: JournalDisk) -> bool:
    """The journal's account of the rename: "swapping" (or later) recorded, the temp gone."""
    return disk.state in _REWRITE_VERIFIED and not os.path.exists(disk.temp_path)


_QEMU = ("qemu-system", "qemu-kvm")


def _end_left_job(target: str, jobs: BlockJobsPort, result: Recovered) -> None:
    """A copy or commit the dead job started: let it end where it was going, then see."""
    running = jobs.active_job(target)
    if running is None:
        return
    if not jobs.wait_ready(target, READY_TIMEOUT_S):
        jobs.abort(target)
        result.actions.append(f"{target}: aborted the {running.type} left running")
        return
    try:
        jobs.pivot(target)
    except NoBlockJob:
        # The dead job's own pivot was under way and ended first.
        result.actions.append(f"{target}: the {running.type} left running ended by itself")
        return
    result.actions.append(f"{target}: pivoted the {running.type} left running")


def _wait_for_persistent(disk: JournalDisk, jobs: BlockJobsPort, result: Recovered) -> None:
    """Libvirt writes the persistent definition back after a pivot; wait for it, bounded."""
    deadline = time.monotonic() + PERSISTENT_TIMEOUT_S
    while (chain := jobs.disk_chain(disk.target, live=False)) not in ((disk.path,), ()):
        if time.monotonic() > deadline:
            result.actions.append(f"{disk.target}: the persistent definition still names "
                                  f"{' -> '.join(map(str, chain))}")  # fmt: skip
            return
        time.sleep(0.1)
