"""The vocabulary that the ports, the job, the policies and the CLI share; imports no libvirt.

``virt.Domain`` produces these from libvirt; tests and other ports build them directly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

DEFAULT_URI = "qemu:///system"


@dataclass(frozen=True)
class GuestFilesystem:
    """A filesystem the guest agent reports, with the disk targets it lives on."""

    mountpoint: str
    fstype: str
    used_bytes: int | None
    total_bytes: int | None
    disk_targets: tuple[str, ...]


@dataclass(frozen=True)
class GuestExecResult:
    """How a command run through guest-exec ended; output truncated to virt.MAX_EXEC_OUTPUT."""

    exitcode: int | None
    signal: int | None
    stdout: str
    stderr: str


class DomainState(enum.StrEnum):
    """A domain's power state, named as in libvirt's ``virDomainState``."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # being shut down
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"


@dataclass(frozen=True)
class DomainObservation:
    """A domain as libvirt described it at one moment: identity, state and live XML."""

    name: str
    uuid: str
    state: DomainState
    persistent: bool
    xml: str


@dataclass(frozen=True)
class AgentInfo:
    """What the guest agent says of itself (``guest-info``, ``guest-get-osinfo``), validated.

    ``enabled`` holds the commands the agent will run: RHEL-family agents ship with
    guest-exec disabled, and an operator may block others (``qemu-ga -b``).
    """

    version: str
    enabled: frozenset[str]
    os_id: str | None = None  # "debian", "rhel", "mswindows", ...
    os_name: str | None = None

    @property
    def is_windows(self) -> bool:
        """True for a Windows guest (no /bin/sh: no zero-fill through guest-exec)."""
        return self.os_id == "mswindows"

    def allows(self, *commands: str) -> bool:
        """True when every one of ``commands`` is enabled."""
        return all(c in self.enabled for c in commands)


@dataclass(frozen=True)
class TrimmedPath:
    """One filesystem in a ``guest-fstrim`` reply: bytes trimmed (None if not told) or an error."""

    path: str
    trimmed: int | None
    error: str | None


@dataclass(frozen=True)
class HostVersions:
    """libvirt's and QEMU's versions as libvirt encodes them: major * 1e6 + minor * 1e3 + micro."""

    libvirt: int
    qemu: int


def version_text(encoded: int) -> str:
    """``9000000`` as ``9.0.0``."""
    return f"{encoded // 1_000_000}.{encoded // 1_000 % 1_000}.{encoded % 1_000}"


@dataclass(frozen=True)
class BlockJob:
    """The block job running on one disk, as ``blockJobInfo`` reports it.

    ``type`` is ``copy``, ``active-commit``, ``commit``, ``pull``, ``backup`` or
    ``unknown``; ``bandwidth`` is in bytes per second, 0 for unlimited.
    """

    type: str
    cur: int
    end: int
    bandwidth: int

    @property
    def complete(self) -> bool:
        """True when cur == end > 0.

        libvirt 9 holds ``cur`` below ``end`` until QEMU says a copy or an active
        commit is ready, so for those this means ready to pivot.
        """
        return self.end > 0 and self.cur == self.end
