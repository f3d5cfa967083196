"""The ports the reclaim job is built on; virt.Domain and qemu_img.QemuImg implement them.

Their methods are documented where they are implemented; tests pass other
implementations. Every mode runs qemu-img through ``ImagePort``, recovery included.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Protocol

from virt_reclaim.image.imagefile import NewImage
from virt_reclaim.image.qemu_img_argv import Extent, ImageInfo
from virt_reclaim.model import (
    AgentInfo,
    BlockJob,
    DomainObservation,
    DomainState,
    GuestExecResult,
    GuestFilesystem,
    HostVersions,
    TrimmedPath,
)
from virt_reclaim.process import ProgressCallback


class GuestAgentPort(Protocol):
    """What freeing space in the guest needs of its agent (virt.Domain provides it)."""

    def fstrim(self, timeout: float = 600.0) -> list[TrimmedPath]: ...
    def guest_exec(
        self,
        path: str,
        args: list[str],
        timeout: float,
        cancel: threading.Event | None = None,
    ) -> GuestExecResult: ...


class DomainPort(GuestAgentPort, Protocol):
    """What the job needs of a libvirt domain (virt.Domain provides it)."""

    name: str
    uuid: str

    def observe(self) -> DomainObservation: ...
    def state(self) -> DomainState: ...
    def inactive_xml(self) -> str: ...
    def define_xml(self, xml: str) -> None: ...
    def shutdown(self, *, use_agent: bool) -> None: ...
    def force_off(self) -> None: ...
    def start(self) -> None: ...
    def wait_for_state(self, wanted: DomainState, timeout: float) -> bool: ...
    def wait_for_agent(self, timeout: float) -> bool: ...
    def agent_ping(self, timeout: int = 5) -> bool: ...
    def guest_filesystems(self) -> list[GuestFilesystem]: ...
    def agent_info(self, timeout: int = 10) -> AgentInfo: ...


class ImagePort(Protocol):
    """What the job needs of qemu-img (qemu_img.QemuImg provides it)."""

    def info(
        self, path: str, *, force_share: bool, image_format: str | None = None
    ) -> list[ImageInfo]: ...
    def measure(self, path: str, *, force_share: bool, image_format: str = "qcow2") -> int: ...
    def map(self, path: str, *, force_share: bool, image_format: str = "qcow2") -> list[Extent]: ...
    def create_overlay(self, image: NewImage, *, backing: str, backing_format: str) -> None: ...
    def convert(
        self,
        source: str,
        target: NewImage,
        *,
        compression: str | None,
        cluster_size: int | None,
        backing: str | None,
        backing_format: str | None,
        size_bytes: int,
        on_progress: ProgressCallback | None,
        preallocation: str = "off",
        rate_limit: int | None = None,
        source_format: str = "qcow2",
        cancel: threading.Event | None = None,
    ) -> None: ...
    def check(self, image: NewImage, *, size_bytes: int) -> None: ...
    def compare(
        self,
        first: str,
        second: NewImage,
        *,
        size_bytes: int,
        first_format: str = "qcow2",
        second_backing: str | None = None,
        second_backing_format: str | None = None,
    ) -> None: ...


class BlockJobsPort(Protocol):
    """What the live mode needs of snapshots and block jobs (virt.BlockJobs provides it)."""

    def snapshot_disk_only(
        self, overlays: Mapping[str, str], *, quiesce: bool, reuse_existing: bool
    ) -> None: ...
    def copy_shallow(
        self, target: str, destination: str, *, destination_format: str = "qcow2"
    ) -> None: ...
    def commit_active(self, target: str) -> None: ...
    def wait_ready(self, target: str, timeout: float) -> bool: ...
    def pivot(self, target: str, *, timeout: float = ...) -> None: ...
    def abort(self, target: str, *, timeout: float = ...) -> None: ...
    def active_job(self, target: str) -> BlockJob | None: ...
    def disk_source(self, target: str, *, live: bool) -> str | None: ...
    def disk_chain(self, target: str, *, live: bool) -> tuple[str | None, ...]: ...
    def close(self) -> None: ...


class LiveDomainPort(DomainPort, Protocol):
    """A domain the live mode can work on: one whose disks take snapshots and block jobs."""

    def block_jobs(self) -> BlockJobsPort: ...
    def versions(self) -> HostVersions: ...
    def block_job(self, target: str) -> BlockJob | None: ...


# Recovery's way to a journaled job's domain: by UUID (``Hypervisor.domain_by_uuid``). The
# live mode's recovery takes it as the LiveDomainPort that its job ran on.
DomainLookup = Callable[[str], DomainPort]
