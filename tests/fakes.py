"""A domain for fast job tests: real image files and real qemu-img; libvirt and the guest faked.

The job's logic (which step does what, what is restored on failure, how a fill is
bounded) is tested in seconds through its ports. What only a real guest can show
(its agent, its filesystems, its boot) is tested with the real test guests.
A guest's zero-fill is played by ``qemu-io`` writing zeros into the real image,
so the host filesystem fills exactly as it would.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from uuid import uuid4
from xml.sax.saxutils import escape

from virt_reclaim.domxml import read
from virt_reclaim.errors import AgentUnavailable, GuestExecCancelled, VirtError
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

MIB = 1024 * 1024
LINUX_AGENT = AgentInfo(
    "7.2.0",
    frozenset({"guest-ping", "guest-info", "guest-exec", "guest-exec-status", "guest-fstrim",
               "guest-get-fsinfo", "guest-shutdown", "guest-get-osinfo"}),
    "debian", "Debian GNU/Linux 12 (bookworm)",
)  # fmt: skip
RHEL_AGENT = AgentInfo(
    "8.2.0", LINUX_AGENT.enabled - {"guest-exec", "guest-exec-status"}, "rhel", "RHEL 9.4"
)
WINDOWS_AGENT = AgentInfo(
    "107.0.1", LINUX_AGENT.enabled, "mswindows", "Microsoft Windows Server 2022"
)


def sh(*argv: str, timeout: float = 120) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout).stdout


def make_image(path: Path, size: str = "1G", writes: tuple[str, ...] = ()) -> Path:
    """A qcow2 image with ``qemu-io`` writes in it (e.g. ``write -P 0xab 0 8M``)."""
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(path), size)
    for command in writes:
        sh("qemu-io", "-f", "qcow2", "-c", command, str(path))
    return path


def write_data(image: Path, offset: int, blob: bytes) -> None:
    """Write ``blob`` at guest offset ``offset`` of ``image``, as a guest would."""
    source = image.with_name(image.name + ".blob")
    source.write_bytes(blob)
    try:
        sh("qemu-io", "-f", "qcow2", "-c", f"write -s {source} {offset} {len(blob)}", str(image))
    finally:
        source.unlink(missing_ok=True)


@dataclass
class FakeDisk:
    target: str
    path: Path
    discard: bool = True
    detect_zeroes: str | None = None
    format: str = "qcow2"
    type: str = "file"  # or "block" (its path is then a device)
    extra_xml: str = ""  # more elements inside <disk>: <readonly/>, <shareable/>...

    def xml(self) -> str:
        driver = f"<driver name='qemu' type='{self.format}'"
        if self.discard:
            driver += " discard='unmap'"
        if self.detect_zeroes:
            driver += f" detect_zeroes='{self.detect_zeroes}'"
        attribute = "dev" if self.type == "block" else "file"
        return (
            f"<disk type='{self.type}' device='disk'>{driver}/>"
            f"<source {attribute}='{escape(str(self.path))}'/>"
            f"<target dev='{self.target}' bus='virtio'/>{self.extra_xml}</disk>"
        )


@dataclass
class FakeDomain:
    """Implements the job's DomainPort over real image files (see the module docstring)."""

    disks: list[FakeDisk]
    name: str = "fake"
    uuid: str = field(default_factory=lambda: str(uuid4()))
    power: DomainState = DomainState.RUNNING
    persistent: bool = True
    agent: AgentInfo | None = LINUX_AGENT
    filesystems: list[GuestFilesystem] = field(default_factory=list)
    trim_reply: list[TrimmedPath] = field(default_factory=list)
    # (offset, length) of the guest's deleted data that a trim discards (with discard on).
    trim_discards: list[tuple[int, int]] = field(default_factory=list)
    ignores_shutdown: bool = False
    # What libvirt says of an agent shutdown that worked but lost the agent's socket.
    agent_shutdown_error: str | None = None
    start_error: str | None = None
    # Called after each chunk a zero-fill writes, with the bytes written so far.
    on_fill_chunk: Callable[[int], None] | None = None
    fill_offset: int = 512 * MIB  # where in the disk the guest's free space lies
    calls: list[str] = field(default_factory=list)
    # How often the job fetched each XML ("live", "inactive"): each fetch is a libvirt
    # call and a parse (tests/unit/job/steps/test_preflight.py holds the job to its count).
    xml_reads: Counter[str] = field(default_factory=Counter)
    inactive_override: str | None = None
    after_shutdown: Callable[[], None] | None = None
    # The definitions define_xml was given, in order; set define_error to refuse them.
    defined: list[str] = field(default_factory=list)
    define_error: str | None = None
    # What libvirt and QEMU report (the live mode's floor is checked against them), and
    # the block jobs someone else runs on disks, by target.
    host_versions: HostVersions = field(default_factory=lambda: HostVersions(9_000_000, 7_002_000))
    foreign_block_jobs: dict[str, BlockJob] = field(default_factory=dict)

    def _xml(self) -> str:
        agent = ""
        if self.agent is not None:
            state = "connected" if self.power is DomainState.RUNNING else "disconnected"
            agent = (
                "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' "
                f"state='{state}'/></channel>"
            )
        disks = "".join(d.xml() for d in self.disks)
        return (
            f"<domain type='qemu'><name>{self.name}</name><uuid>{self.uuid}</uuid>"
            f"<devices>{disks}{agent}</devices></domain>"
        )

    # -- DomainPort ---------------------------------------------------------------------
    def observe(self) -> DomainObservation:
        self.xml_reads["live"] += 1
        return DomainObservation(self.name, self.uuid, self.power, self.persistent, self._xml())

    def state(self) -> DomainState:
        return self.power

    def inactive_xml(self) -> str:
        self.xml_reads["inactive"] += 1
        return self.inactive_override or self._xml()

    def define_xml(self, xml: str) -> None:
        """Take the disks' driver and source from ``xml``, as the next start would."""
        self.calls.append("define_xml")
        if self.define_error is not None:
            raise VirtError(f"{self.name}: cannot define: {self.define_error}")
        spec = read.parse_domain(xml)
        assert spec.uuid == self.uuid, "a definition of another domain"
        by_target = {d.target: d for d in spec.disks}
        for disk in self.disks:
            new = by_target[disk.target]
            assert new.source is not None and new.format is not None
            disk.path, disk.format = Path(new.source), new.format
            disk.discard = new.discard == "unmap"
            disk.detect_zeroes = new.detect_zeroes
        self.defined.append(xml)
        self.inactive_override = None

    # -- what the live mode asks before it starts (LiveDomainPort) --------------------------
    def versions(self) -> HostVersions:
        return self.host_versions

    def block_job(self, target: str) -> BlockJob | None:
        return self.foreign_block_jobs.get(target)

    def shutdown(self, *, use_agent: bool) -> None:
        self.calls.append(f"shutdown(agent={use_agent})")
        if self.power is not DomainState.RUNNING:
            raise VirtError(f"{self.name}: cannot shut down: domain is not running")
        if not self.ignores_shutdown:
            self.power = DomainState.SHUTOFF
            if self.after_shutdown is not None:
                self.after_shutdown()
        if use_agent and self.agent_shutdown_error is not None:
            raise VirtError(f"{self.name}: cannot shut down: {self.agent_shutdown_error}")

    def force_off(self) -> None:
        self.calls.append("force_off")
        self.power = DomainState.SHUTOFF

    def start(self) -> None:
        self.calls.append("start")
        if self.start_error is not None:
            raise VirtError(f"{self.name}: cannot start: {self.start_error}")
        if self.power is not DomainState.SHUTOFF:
            raise VirtError(f"{self.name}: cannot start: domain is already running")
        self.power = DomainState.RUNNING

    def wait_for_state(self, wanted: DomainState, timeout: float) -> bool:
        return self.power is wanted

    def wait_for_agent(self, timeout: float) -> bool:
        return self.agent is not None and self.power is DomainState.RUNNING

    def agent_ping(self, timeout: int = 5) -> bool:
        return self.agent is not None and self.power is DomainState.RUNNING

    def guest_filesystems(self) -> list[GuestFilesystem]:
        self._need_agent("guest-get-fsinfo")
        return list(self.filesystems)

    def agent_info(self, timeout: int = 10) -> AgentInfo:
        self._need_agent("guest-info")
        assert self.agent is not None
        return self.agent

    def fstrim(self, timeout: float = 600.0) -> list[TrimmedPath]:
        self._need_agent("guest-fstrim")
        self.calls.append("fstrim")
        for offset, length in self.trim_discards:
            for disk in self.disks:
                if disk.discard:
                    sh("qemu-io", "-f", disk.format, "-c", f"discard {offset} {length}",
                       str(disk.path))  # fmt: skip
        return list(self.trim_reply)

    def guest_exec(
        self,
        path: str,
        args: list[str],
        timeout: float,
        cancel: threading.Event | None = None,
    ) -> GuestExecResult:
        self._need_agent("guest-exec")
        assert path == "/bin/sh" and "virt-reclaim-zero" in args[1], args
        mountpoint, limit = args[3], int(args[5]) * MIB
        self.calls.append(f"zero-fill({mountpoint}, {limit})")
        disk = self.disks[0]
        written = 0
        chunk = 8 * MIB
        while written < limit:
            if cancel is not None and cancel.is_set():
                raise GuestExecCancelled("guest-exec /bin/sh: stopped on request")
            if self.power is DomainState.PAUSED:
                # A paused guest writes nothing; the fill waits, as the real one would.
                if cancel is not None and cancel.wait(0.05):
                    raise GuestExecCancelled("guest-exec /bin/sh: stopped on request")
                continue
            size = min(chunk, limit - written)
            command = "write -z" if disk.detect_zeroes else "write -P 0"
            sh("qemu-io", "-f", disk.format, "-c",
               f"{command} {self.fill_offset + written} {size}", str(disk.path))  # fmt: skip
            written += size
            if self.on_fill_chunk is not None:
                self.on_fill_chunk(written)
        return GuestExecResult(0, None, f"zeroed {written}\n", "")

    def _need_agent(self, command: str) -> None:
        if self.agent is None or self.power is not DomainState.RUNNING:
            raise AgentUnavailable(f"{command}: the guest agent is not connected")
        if command not in self.agent.enabled:
            raise AgentUnavailable(f"{command}: the command is disabled")


def linux_fs(mountpoint: str, target: str, *, total: int, used: int) -> GuestFilesystem:
    return GuestFilesystem(mountpoint, "ext4", used, total, (target,))


class OpenWatch:
    """Whether anyone opened a file, from inotify's IN_OPEN (a canary the tests plant).

    QEMU's file driver refuses a FIFO before opening it, so only a regular file
    watched this way proves that nothing read it.
    """

    _IN_OPEN = 0x20
    _IN_NONBLOCK = 0o4000

    def __init__(self, path: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(self._IN_NONBLOCK)
        assert self._fd >= 0, os.strerror(ctypes.get_errno())
        watch = self._libc.inotify_add_watch(self._fd, str(path).encode(), self._IN_OPEN)
        assert watch >= 0, os.strerror(ctypes.get_errno())

    def opened(self) -> bool:
        """True once the file was opened since the watch began."""
        try:
            return bool(os.read(self._fd, 4096))
        except BlockingIOError:
            return False

    def close(self) -> None:
        os.close(self._fd)
