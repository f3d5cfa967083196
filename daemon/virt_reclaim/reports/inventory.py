"""What each domain has: state, agent, and every disk with its sizes on the host."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, replace

from virt_reclaim.domxml import read
from virt_reclaim.errors import QemuImgError
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.freespace.agent import Choice, choose_method
from virt_reclaim.job.settings import FreeSpaceMethod
from virt_reclaim.model import AgentInfo, DomainObservation, DomainState


@dataclass(frozen=True)
class BackingFile:
    """One image below a disk's top image."""

    path: str
    format: str | None


@dataclass(frozen=True)
class DiskReport:
    """A disk of a domain, with what qemu-img and the host filesystem say of its image.

    Sizes are None where they do not apply (no file) or could not be read;
    ``error`` then says why.
    """

    target: str
    device: str
    type: str
    format: str | None
    source: str | None
    virtual_size: int | None
    allocated_bytes: int | None
    backing_chain: tuple[BackingFile, ...]
    internal_snapshots: int | None
    error: str | None


@dataclass(frozen=True)
class DomainReport:
    """A domain and its disks."""

    name: str
    uuid: str
    state: DomainState
    persistent: bool
    has_agent_channel: bool
    agent_connected: bool
    disks: tuple[DiskReport, ...]
    os: str | None = None  # what the agent says (guest-get-osinfo), e.g. "debian", "mswindows"
    free_space: str = "-"  # the method a job could use now, and why not when none


def free_space_summary(choice: Choice) -> str:
    """``trim``, ``zero``, or ``none (why)`` for the ``domains`` table."""
    if choice.method is FreeSpaceMethod.NONE:
        return f"none ({choice.why})"
    return str(choice.method)


def images_in_use(domains: Iterable[DomainObservation], *, exclude_uuid: str) -> dict[str, str]:
    """{real path: domain name} of every image file (sources and backing files) the domains use.

    The domain ``exclude_uuid`` is left out: the one being reclaimed.
    """
    used: dict[str, str] = {}
    for domain in domains:
        if domain.uuid == exclude_uuid:
            continue
        for disk in read.parse_domain(domain.xml).disks:
            paths = [disk.source] if disk.type == "file" else []
            paths += [layer.source for layer in disk.backing if layer.type == "file"]
            for path in paths:
                if path:
                    used[os.path.realpath(path)] = domain.name
    return used


def describe_domain(
    domain: DomainObservation,
    *,
    qemu_img_path: str,
    agent: AgentInfo | str | None = None,
) -> DomainReport:
    """Describe one domain; an unreadable image becomes an ``error`` on its disk, not a failure.

    ``agent`` is what its agent said of itself, or why it could not be asked; with it the
    report says which free-space method a job could use (``auto``, as a policy's default).
    """
    spec = read.parse_domain(domain.xml)
    running = domain.state not in (DomainState.SHUTOFF, DomainState.CRASHED)
    free_space = "-"
    if isinstance(agent, str):
        free_space = f"unknown ({agent})"
    elif running:
        qcow2 = [d for d in spec.disks if d.is_file_qcow2]
        choice = choose_method(
            FreeSpaceMethod.AUTO,
            all_disks_discard=bool(qcow2) and all(d.discard == "unmap" for d in qcow2),
            agent=agent,
        )
        free_space = free_space_summary(choice)
    return DomainReport(
        os=agent.os_id if isinstance(agent, AgentInfo) else None,
        free_space=free_space,
        name=domain.name,
        uuid=domain.uuid,
        state=domain.state,
        persistent=domain.persistent,
        has_agent_channel=spec.has_agent_channel,
        agent_connected=running and spec.agent_state == "connected",
        disks=tuple(
            describe_disk(disk, in_use=running, qemu_img_path=qemu_img_path) for disk in spec.disks
        ),
    )


def describe_disk(disk: read.DiskSpec, *, in_use: bool, qemu_img_path: str) -> DiskReport:
    """Describe one disk; only file-backed disks are measured."""
    report = DiskReport(
        target=disk.target,
        device=disk.device,
        type=disk.type,
        format=disk.format,
        source=disk.source,
        virtual_size=None,
        allocated_bytes=None,
        backing_chain=tuple(
            BackingFile(layer.source or "", layer.format) for layer in disk.backing
        ),
        internal_snapshots=None,
        error=None,
    )
    if disk.type != "file" or disk.source is None:
        return report
    try:
        allocated = os.stat(disk.source).st_blocks * 512
        # A running QEMU holds the image locked; -U reads the header anyway.
        # The format the XML states (libvirt's default is raw): never a probe of guest bytes.
        chain = QemuImg(qemu_img_path).info(disk.source, force_share=in_use,
                                            image_format=disk.format or "raw")  # fmt: skip
    except OSError as exc:
        return replace(report, error=f"{disk.source}: {exc.strerror}")
    except QemuImgError as exc:
        return replace(report, error=str(exc))
    top = chain[0]
    return replace(
        report,
        virtual_size=top.virtual_size,
        allocated_bytes=allocated,
        backing_chain=tuple(BackingFile(layer.filename, layer.format) for layer in chain[1:]),
        internal_snapshots=top.snapshot_count,
    )
