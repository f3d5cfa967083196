"""The only module that imports libvirt; everything else uses the small interface here."""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import libvirt

DEFAULT_URI = "qemu:///system"


def _silence_default_error_handler(_ctx: object, _err: object) -> None:
    """Drop libvirt's own printing; every error reaches us as an exception anyway."""


libvirt.registerErrorHandler(_silence_default_error_handler, None)


class VirtError(Exception):
    """libvirt refused or failed a request."""


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


_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PMSUSPENDED,
}


@dataclass(frozen=True)
class DomainSnapshot:
    """A domain as libvirt described it at one moment: identity, state and live XML."""

    name: str
    uuid: str
    state: DomainState
    persistent: bool
    xml: str


class Hypervisor:
    """A connection to libvirtd.

    Use as a context manager, or call ``close()``.
    """

    def __init__(self, uri: str = DEFAULT_URI, *, read_only: bool = False) -> None:
        """Connect to ``uri``.

        Raises:
            VirtError: libvirtd cannot be reached or refused the connection.
        """
        self.uri = uri
        try:
            self._conn: Any = libvirt.openReadOnly(uri) if read_only else libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise VirtError(f"cannot connect to {uri}: {_message(exc)}") from exc

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def domains(self) -> list[DomainSnapshot]:
        """Return every domain, active and inactive, sorted by name.

        A domain that disappears while it is being read is left out.

        Raises:
            VirtError: The domains cannot be listed.
        """
        try:
            found = self._conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise VirtError(f"cannot list domains: {_message(exc)}") from exc
        result = []
        for dom in found:
            try:
                result.append(_snapshot(dom))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue
                raise VirtError(f"cannot read domain: {_message(exc)}") from exc
        return sorted(result, key=lambda d: d.name)


def _snapshot(dom: Any) -> DomainSnapshot:  # noqa: ANN401 - libvirt.virDomain has no stubs
    state, _reason = dom.state()
    return DomainSnapshot(
        name=dom.name(),
        uuid=dom.UUIDString(),
        state=_STATES.get(state, DomainState.NOSTATE),
        persistent=bool(dom.isPersistent()),
        xml=dom.XMLDesc(0),
    )


def _message(exc: Any) -> str:  # noqa: ANN401 - libvirt.libvirtError has no stubs
    return str(exc.get_error_message() or exc)
