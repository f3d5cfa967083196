"""The free-space step, shared by every mode: trim or a bounded, watched zero-fill, then a check.

After the guest's space is freed the gain is estimated again and the room for the
rewrite checked again, so that a job that would gain too little, or no longer fit,
stops before the guest goes down.
"""

from __future__ import annotations

from virt_reclaim.errors import GuestExecCancelled
from virt_reclaim.image import imagefile
from virt_reclaim.job.context import JobContext
from virt_reclaim.job.freespace import budget
from virt_reclaim.job.freespace.agent import FreeSpaceResult, trim, zero_fill
from virt_reclaim.job.freespace.watch import FillWatch
from virt_reclaim.job.results import FreedInPlace, JobFailed, NothingToDo
from virt_reclaim.job.settings import FreeSpaceMethod
from virt_reclaim.job.steps import estimate, preflight
from virt_reclaim.units import format_bytes


def free_guest_space(job: JobContext) -> None:
    """Free the guest's unused space as the estimate chose; never worse for the host."""
    choice = job.choice
    if choice is None or choice.method is FreeSpaceMethod.NONE:
        why = choice.why if choice is not None else "no guest agent connected"
        if job.agent is not None:
            job.free_space = "none"
        job.log.info("free_space.unavailable", reason=why)
        return
    mountpoints = [fs.mountpoint for fs in job.guest_filesystems]
    if choice.method is FreeSpaceMethod.TRIM:
        result = trim(job.domain, mountpoints, timeout=job.settings.free_space_timeout_s)
    else:
        # Worked out again now: the host's free space may have changed since the estimate.
        job.fill_budget = estimate.fill_budget(job)
        result = _zero_fill(job, job.fill_budget)
    job.free_space = str(result.method)
    _count_zeroed(job, result)
    if result.problem:
        job.log.warning("free_space.unavailable", method=str(choice.method),
                        reason=result.problem)  # fmt: skip
    job.log.info("free_space.done", method=str(result.method), filesystems=result.filesystems,
                 trimmed_bytes=result.trimmed_bytes, zeroed_bytes=result.zeroed_bytes,
                 fills=[fill.to_json() for fill in result.fills])  # fmt: skip
    if result.method is not FreeSpaceMethod.NONE:
        # After a trim, the map of a running image may still show what it freed (stale
        # metadata): count the deleted data as freed. After a zero-fill the zeros are in
        # the image: what garbage is still there stays.
        _recheck_gain(job, 1.0 if result.method is FreeSpaceMethod.TRIM else 0.0)
    # The fill may have grown the image, or another guest taken the room: find out
    # before the guest goes down, not after.
    preflight.check_room(job)


def _zero_fill(job: JobContext, fill_budget: budget.FillBudget) -> FreeSpaceResult:
    """Run the fill under a watch of the host's filesystems and of the guest's state."""
    watch = FillWatch(fill_budget, job.domain, job.stop)
    with watch:
        try:
            return zero_fill(
                job.domain,
                fill_budget.fills,
                timeout=job.settings.free_space_timeout_s,
                cancel=watch.stop,
            )
        except GuestExecCancelled:
            if watch.paused:
                job.log.error("free_space.guest_paused", reason=watch.why)
                raise JobFailed(
                    f"the guest was paused during the zero-fill: {watch.why}. Free space "
                    f"on that filesystem, then resume it (virsh resume {job.domain.name}); "
                    "the fill in the guest stops at its size limit and removes its file"
                ) from None
            if watch.why is None:
                raise  # the job is stopping
            job.log.warning("free_space.stopped", reason=watch.why)
            return FreeSpaceResult(FreeSpaceMethod.NONE, (), f"zero-fill stopped: {watch.why}")


def _count_zeroed(job: JobContext, result: FreeSpaceResult) -> None:
    target_of = {fs.mountpoint: next(iter(fs.disk_targets), None) for fs in job.guest_filesystems}
    by_target = {d.target: d for d in job.disks}
    for fill in result.fills:
        disk = by_target.get(str(target_of.get(fill.mountpoint)))
        if disk is not None:
            disk.zeroed_bytes += fill.zeroed_bytes


def _recheck_gain(job: JobContext, share: float) -> None:
    """Estimate again now that the guest's space is free, before any downtime."""
    estimate.read_guest_filesystems(job)
    used = {d.target: 0 for d in job.disks}
    for fs in job.guest_filesystems:
        for target in set(fs.disk_targets) & set(used):
            used[target] += fs.used_bytes or 0
    gain = total = freed = 0
    for disk in job.disks:
        disk.guest_used = used[disk.target] or disk.guest_used
        again = estimate.estimate_disk(job, disk, share)
        now = imagefile.allocated_bytes(disk.path)
        gain += now - min(again.after, now)
        total += now
        freed += max(0, disk.bytes_before - now)
        job.log.info("disk.reestimated", target=disk.target, estimated_after=again.after,
                     basis=again.basis)  # fmt: skip
    try:
        estimate.require_gain(job, gain, total, "after freeing the guest's space, the ")
    except NothingToDo as exc:
        if freed < max(job.settings.min_gain, 1):
            raise
        # The trim did the work: the space is back on the host, and a rewrite is not worth
        # the guest's downtime. Say so as a reclaim, with the figures.
        for disk in job.disks:
            disk.bytes_after = imagefile.allocated_bytes(disk.path)
            disk.freed_in_place = True
        raise FreedInPlace(
            f"the {job.free_space} freed {format_bytes(freed)} in place; {exc}: no rewrite"
        ) from None
