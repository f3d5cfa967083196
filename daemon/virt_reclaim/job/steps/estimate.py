"""The estimate step: each disk's size after the reclaim, and whether the gain is worth a job.

Read-only. The arithmetic is ``image.sizing``'s; this step gathers its inputs: what
the agent says the guest uses, how the free-space step will free the rest (the
zero-fill's budget), and what this domain's earlier reclaims reached. The free-space
step estimates again after it freed the guest's space.
"""

from __future__ import annotations

import os

from virt_reclaim.errors import AgentUnavailable
from virt_reclaim.image.qemu_img_argv import DEFAULT_CLUSTER
from virt_reclaim.image.sizing import (
    SizeEstimate,
    content_of,
    estimate_after,
    sample_image,
    sample_offsets,
)
from virt_reclaim.job.context import DiskWork, JobContext
from virt_reclaim.job.freespace import budget
from virt_reclaim.job.freespace.agent import choose_method, freed_share
from virt_reclaim.job.results import NothingToDo
from virt_reclaim.job.settings import Compression, FreeSpaceMethod
from virt_reclaim.job.steps import preflight
from virt_reclaim.units import format_bytes


def estimate(job: JobContext) -> None:
    """Estimate each disk's size after the reclaim; ``NothingToDo`` below the minimum gain."""
    read_guest_filesystems(job)
    used_by_target: dict[str, int] = {}
    for fs in job.guest_filesystems:
        for target in fs.disk_targets:
            used_by_target[target] = used_by_target.get(target, 0) + (fs.used_bytes or 0)
    all_discard = all(d.discard for d in job.disks)
    job.choice = choose_method(
        job.settings.free_space,
        all_disks_discard=all_discard,
        agent=job.agent if job.was_running else None,
    )
    for disk in job.disks:
        disk.bytes_before = disk.allocated()
        disk.cluster_size = job.settings.cluster_size or disk.info.cluster_size or DEFAULT_CLUSTER
        disk.rewrite_need = preflight.rewrite_need(job, disk)
        disk.guest_used = used_by_target.get(disk.target)
    reach = 0.0
    if job.choice.method is FreeSpaceMethod.ZERO:
        job.fill_budget = fill_budget(job)
        reach = job.fill_budget.reach()
    share = freed_share(job.choice, all_disks_discard=all_discard, fill_reach=reach)
    fills = _fills_by_target(job) if job.fill_budget is not None else {}
    for disk in job.disks:
        disk.estimate = estimate_disk(job, disk, share, fills.get(disk.target))
        disk.estimated_after = disk.estimate.after
        job.log.info("disk.estimated", target=disk.target, bytes_before=disk.bytes_before,
                     estimated_after=disk.estimated_after, basis=disk.estimate.basis,
                     guest_used=disk.guest_used,
                     stored_ratio=round(disk.estimate.stored_ratio, 3),
                     freed_share=round(share, 3), free_space=str(job.choice.method),
                     free_space_why=job.choice.why)  # fmt: skip
        job.record_disk(
            disk,
            bytes_before=disk.bytes_before,
            estimated_after=disk.estimated_after,
            guest_used=disk.guest_used,
        )
    gain = sum(d.bytes_before - (d.estimated_after or d.bytes_before) for d in job.disks)
    require_gain(job, gain, sum(d.bytes_before for d in job.disks), "")


def require_gain(job: JobContext, gain: int, total: int, when: str) -> None:
    """Raise ``NothingToDo`` when ``gain`` is below the minimum, in bytes or in percent.

    A job that converts a disk is wanted for the conversion itself: no minimum.
    """
    if any(d.converted_path for d in job.disks):
        return
    if gain < job.settings.min_gain:
        raise NothingToDo(
            f"{when}estimated gain {format_bytes(max(0, gain))} is below the minimum of "
            f"{format_bytes(job.settings.min_gain)}"
        )
    percent = 100.0 * gain / total if total else 0.0
    if percent < job.settings.min_gain_percent:
        raise NothingToDo(
            f"{when}estimated gain {percent:.1f} % is below the minimum of "
            f"{job.settings.min_gain_percent:g} %"
        )


def read_guest_filesystems(job: JobContext) -> None:
    """Ask the agent which filesystems lie on the disks being reclaimed (if it answers)."""
    if not job.agent_connected:
        return
    targets = {d.target for d in job.disks}
    try:
        job.guest_filesystems = [
            fs for fs in job.domain.guest_filesystems() if targets & set(fs.disk_targets)
        ]
    except AgentUnavailable as exc:
        job.log.info("agent.unavailable", reason=str(exc))


def _fills_by_target(job: JobContext) -> dict[str, tuple[int, int]]:
    """Per disk, (bytes the zero-fill may write, free bytes it does not reach)."""
    assert job.fill_budget is not None  # noqa: S101 - called only with a budget
    targets = {fs.mountpoint: fs.disk_targets for fs in job.guest_filesystems}
    fills: dict[str, tuple[int, int]] = {}
    for fill in job.fill_budget.fills:
        for target in targets.get(fill.mountpoint, ())[:1]:
            reached, unreached = fills.get(target, (0, 0))
            fills[target] = (reached + fill.limit, unreached + fill.unreached)
    return fills


def estimate_disk(
    job: JobContext, disk: DiskWork, share: float, fill: tuple[int, int] | None = None
) -> SizeEstimate:
    """Estimate ``disk``'s size after the reclaim (see ``estimate.estimate_after``)."""
    cluster = disk.info.cluster_size or DEFAULT_CLUSTER
    extents = job.images.map(disk.path, force_share=job.was_running, image_format=disk.format)
    # A flat VMDK's map gives offsets in its extent file, where the guest's data is.
    sample = sample_image(disk.data_file or disk.path, sample_offsets(extents, cluster), cluster)
    history = None
    learn = job.history or (job.journal.compression_ratio if job.journal is not None else None)
    if learn is not None and disk.guest_used:
        history = learn(job.domain.uuid, disk.target, str(job.settings.compression))
    return estimate_after(
        allocated=disk.bytes_before,
        virtual_size=disk.info.virtual_size,
        cluster=job.settings.cluster_size or cluster,
        content=content_of(extents),
        sample=sample,
        compressed=job.settings.compression is not Compression.NONE,
        guest_used=disk.guest_used,
        freed_share=share,
        history_ratio=history,
        fill=fill,
    )


def fill_budget(job: JobContext) -> budget.FillBudget:
    """How much a zero-fill may write into each guest filesystem (see ``freespace.budget``)."""
    rooms = [
        budget.DiskRoom(
            target=d.target,
            host=budget.host_filesystem(os.path.dirname(d.path)),
            headroom=max(0, d.info.virtual_size - d.allocated()),
            zeros_become_holes=d.zeros_become_holes,
            rewrite_need=d.rewrite_need,
        )
        for d in job.disks
    ]
    volumes = [
        budget.GuestVolume(fs.mountpoint, fs.disk_targets, fs.total_bytes, fs.used_bytes, fs.fstype)
        for fs in job.guest_filesystems
    ]
    return budget.fill_limits(rooms, volumes, job.settings.reserve)
