"""The steps every mode takes before it changes anything: inspect and estimate.

Read-only: a dry run (``plan``, the daemon's queue) is exactly these two steps and the
preflight (``steps.preflight``).
"""

from __future__ import annotations

import os
from typing import cast

from virt_reclaim.domxml import read
from virt_reclaim.errors import AgentUnavailable, QemuImgError
from virt_reclaim.image import imagefile
from virt_reclaim.image.qemu_img_argv import DEFAULT_CLUSTER, ImageInfo
from virt_reclaim.job.context import DiskWork, JobContext
from virt_reclaim.job.freespace import budget
from virt_reclaim.job.freespace.agent import choose_method, freed_share
from virt_reclaim.job.modes import conversion, livecheck
from virt_reclaim.job.ports import LiveDomainPort
from virt_reclaim.job.results import JobSkipped, NothingToDo, SkippedDisk
from virt_reclaim.job.settings import Compression, FreeSpaceMethod
from virt_reclaim.job.steps import preflight
from virt_reclaim.job.steps.estimate import (
    SizeEstimate,
    content_of,
    estimate_after,
    sample_image,
    sample_offsets,
)
from virt_reclaim.journal.records import JournalDisk
from virt_reclaim.model import DomainState
from virt_reclaim.units import format_bytes


def inspect(job: JobContext, *, live: bool = False) -> None:
    """Find the eligible disks and journal what recovery needs; skip the job if there are none.

    With ``live`` (a running guest to be kept running), the job is skipped on a host
    too old for the live sequence, and disks it does not cover are skipped too: those
    with a backing chain or a block job running (``livecheck``). With ``rewrite.convert``
    a raw or VMDK disk is eligible for conversion (``conversion.disk_to_convert`` says when not).
    """
    observed = job.domain.observe()
    if not observed.persistent:
        raise JobSkipped("transient domain: it has no definition to restart it from")
    if observed.state not in (DomainState.RUNNING, DomainState.SHUTOFF):
        raise JobSkipped(f"domain is {observed.state}; only running or shut off domains qualify")
    job.was_running = observed.state is DomainState.RUNNING
    running = read.parse_domain(observed.xml)
    persistent_spec = job.definition = read.parse_domain(job.domain.inactive_xml())
    persistent = {d.target: d for d in persistent_spec.disks}
    differs = conversion.definitions_differ(running, persistent_spec) if job.was_running else None
    _read_agent(job, running)
    live_domain = cast(LiveDomainPort, job.domain) if live and job.was_running else None
    if live_domain is not None and (refusal := livecheck.host_refusal(live_domain.versions())):
        raise JobSkipped(refusal)
    job.live = live_domain is not None
    others = job.images_of_other_domains()
    for disk in running.disks:
        if job.settings.convert and conversion.wants(disk):
            found = conversion.disk_to_convert(job, disk, others, live=live and job.was_running,
                                               differs=differs)  # fmt: skip
        else:
            found = _disk_to_reclaim(job, disk, persistent.get(disk.target), others)
        if isinstance(found, DiskWork) and live_domain is not None:
            found = livecheck.disk_refusal(live_domain, found) or found
        if isinstance(found, DiskWork):
            job.disks.append(found)
        else:
            job.skipped_disks.append(SkippedDisk(disk.target, disk.source or "", found))
            job.log.info("disk.skipped", target=disk.target, path=disk.source, reason=found)
    if not job.disks:
        reasons = "; ".join(f"{s.target}: {s.reason}" for s in job.skipped_disks)
        raise JobSkipped(f"no eligible disk ({reasons or 'the domain has no disks'})")
    if job.journal is not None:
        job.journal.record_for_recovery(
            job.job_id,
            str(observed.state),
            [JournalDisk(d.target, d.path, d.temp, d.backup) for d in job.disks],
        )


def _read_agent(job: JobContext, running: read.DomainSpec) -> None:
    """What the guest's agent says of the guest, when one is connected."""
    job.agent_connected = job.was_running and running.agent_state == "connected"
    if job.agent_connected:
        try:
            job.agent = job.domain.agent_info()
        except AgentUnavailable as exc:
            job.log.info("agent.unavailable", reason=str(exc))


def _disk_to_reclaim(  # noqa: PLR0911 - one return per eligibility rule, in order
    job: JobContext,
    disk: read.DiskSpec,
    persistent: read.DiskSpec | None,
    others: dict[str, str],
) -> DiskWork | str:
    """The work of reclaiming ``disk``, or why it cannot be reclaimed."""
    if disk.device != "disk":
        return f"a {disk.device}, not a disk"
    if not disk.is_file_qcow2 or disk.source is None:
        hint = (
            "; rewrite.convert = true (run --convert) converts it to qcow2"
            if disk.type == "file" and disk.format in conversion.CONVERTIBLE_FORMATS
            else ""
        )
        return f"not a file-backed qcow2 disk (type {disk.type}, format {disk.format}){hint}"
    if disk.readonly or disk.shareable:
        return "read-only or shared disk"
    if disk.encrypted:
        return "encrypted disk"
    if persistent is None or persistent.source != disk.source:
        return "the running and the persistent definition use different images"
    user = others.get(os.path.realpath(disk.source))
    if user is not None:
        return f"the image is also used by domain {user}"
    if os.path.islink(disk.source):
        # The rename would replace the link with a file and never free its target.
        return (
            f"the source is a symlink to {os.path.realpath(disk.source)}: point the "
            "definition at the file itself to reclaim it"
        )
    try:
        # The format the XML states, never a probe of what the guest wrote.
        chain = job.images.info(disk.source, force_share=job.was_running, image_format=disk.format)
    except QemuImgError as exc:
        return f"unreadable image: {exc}"
    top = chain[0]
    if (problem := _image_problem(chain, disk.backing)) is not None:
        return problem
    backup = (
        imagefile.backup_path(disk.source, job.started_wall)
        if job.settings.keep_backup is not None
        else None
    )
    return DiskWork(
        target=disk.target,
        path=disk.source,
        discard=disk.discard == "unmap",
        zeros_become_holes=disk.zeros_become_holes,
        info=top,
        temp=imagefile.temp_path(disk.source, job.job_id),
        backup=backup,
    )


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


def _image_problem(chain: list[ImageInfo], backing: tuple[read.BackingLayer, ...]) -> str | None:
    """Why the image's headers rule out a rewrite, or None (see ``_disk_to_reclaim``)."""
    top = chain[0]
    if top.format != "qcow2":
        return f"the image is {top.format}, not qcow2"
    for layer, defined in zip(chain, backing, strict=False):
        if defined.format is not None and defined.format != layer.backing_format:
            return (
                f"the definition says {defined.format} for the backing file "
                f"{layer.backing_filename}, the image's header {layer.backing_format}"
            )
    if top.snapshot_count:
        return f"{top.snapshot_count} internal snapshot(s), which a rewrite would drop"
    if top.encrypted:
        return "encrypted image"
    if top.corrupt:
        return "the image is marked corrupt; run qemu-img check"
    return None


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
