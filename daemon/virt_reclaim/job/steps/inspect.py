"""The inspect step: which disks of the domain the job takes, and why it leaves the others.

Read-only, as the estimate (``steps.estimate``) and the preflight (``steps.preflight``)
after it: a dry run (``plan``, the daemon's queue) is exactly these three steps.
"""

from __future__ import annotations

import os
from typing import cast

from virt_reclaim.domxml import read
from virt_reclaim.errors import AgentUnavailable, QemuImgError
from virt_reclaim.image import imagefile
from virt_reclaim.image.qemu_img_argv import ImageInfo
from virt_reclaim.job.context import DiskWork, JobContext
from virt_reclaim.job.modes import conversion, livecheck
from virt_reclaim.job.ports import LiveDomainPort
from virt_reclaim.job.results import JobSkipped, SkippedDisk
from virt_reclaim.journal.records import JournalDisk
from virt_reclaim.model import DomainState


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
