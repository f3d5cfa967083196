"""The connection to libvirtd: keepalive, reconnect, lifecycle events, domain lookups, stats."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import libvirt
import structlog

from virt_reclaim.errors import VirtError
from virt_reclaim.model import DEFAULT_URI, DomainObservation
from virt_reclaim.virt.common import error_message, observe_domain
from virt_reclaim.virt.domain import Domain
from virt_reclaim.virt.events import start_event_loop

# How long a job waits for libvirtd to come back before it gives up.
RECONNECT_TIMEOUT_S = 120.0


# libvirt's virDomainEventType, named for logs
_LIFECYCLE_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}

_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timed out",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by us",
}

LifecycleCallback = Callable[[str, str, str], None]  # (domain uuid, domain name, event)


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
        self._read_only = read_only
        # Events (lifecycle, block jobs) reach only connections opened after the loop started.
        start_event_loop()
        try:
            self._conn: Any = self._open()
        except libvirt.libvirtError as exc:
            raise VirtError(f"cannot connect to {uri}: {error_message(exc)}") from exc

    def _open(self) -> Any:  # noqa: ANN401 - libvirt.virConnect has no stubs
        return libvirt.openReadOnly(self.uri) if self._read_only else libvirt.open(self.uri)

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

    def alive(self) -> bool:
        """True while the connection to libvirtd works."""
        try:
            return bool(self._conn is not None and self._conn.isAlive() == 1)
        except libvirt.libvirtError:
            return False

    def reconnect(self, timeout: float = RECONNECT_TIMEOUT_S) -> None:
        """Open the connection again, with backoff, after libvirtd went away.

        Raises:
            VirtError: libvirtd did not come back within ``timeout`` seconds.
        """
        log = structlog.get_logger("virt_reclaim.virt").bind(uri=self.uri)
        log.warning("libvirt.disconnected")
        deadline = time.monotonic() + timeout
        delay = 0.5
        while True:
            try:
                self._conn = self._open()
            except libvirt.libvirtError as exc:
                if time.monotonic() + delay > deadline:
                    raise VirtError(
                        f"libvirtd at {self.uri} did not come back within {timeout:g} s: "
                        f"{error_message(exc)}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.info("libvirt.reconnected")
            return

    def watch(
        self,
        on_lifecycle: LifecycleCallback,
        on_close: Callable[[str], None],
        keepalive: tuple[int, int] = (5, 3),
    ) -> None:
        """Deliver lifecycle events and the connection's loss; needs ``start_event_loop``.

        The callbacks run on the event loop's thread and must not block or call libvirt.
        With the keepalive (interval seconds, missed answers), a libvirtd that hangs or
        vanishes without closing the socket is noticed too.
        """
        interval, count = keepalive
        try:
            self._conn.setKeepAlive(interval, count)
        except libvirt.libvirtError as exc:
            # Only connections through a socket have keepalives (not test:///, say).
            if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise VirtError(
                    f"cannot set a keepalive on {self.uri}: {error_message(exc)}"
                ) from exc
        try:

            def lifecycle(_conn: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:  # noqa: ANN401
                on_lifecycle(dom.UUIDString(), dom.name(), _LIFECYCLE_EVENTS.get(event, "other"))

            def agent(_conn: Any, dom: Any, _state: int, _reason: int, _opaque: Any) -> None:  # noqa: ANN401
                on_lifecycle(dom.UUIDString(), dom.name(), "agent")

            def closed(_conn: Any, reason: int, _opaque: Any) -> None:  # noqa: ANN401
                on_close(_CLOSE_REASONS.get(reason, "unknown"))

            self._conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None
            )
            self._conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, agent, None
            )
            self._conn.registerCloseCallback(closed, None)
        except libvirt.libvirtError as exc:
            raise VirtError(f"cannot watch {self.uri} for events: {error_message(exc)}") from exc

    def domain_stats(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(name, uuid, record) of every domain from one ``getAllDomainStats`` call.

        The record holds the state, CPU time, block and interface counters that
        idle detection reads (see ``idle.sample_from_stats``).
        """
        groups = (
            libvirt.VIR_DOMAIN_STATS_STATE
            | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
            | libvirt.VIR_DOMAIN_STATS_BLOCK
            | libvirt.VIR_DOMAIN_STATS_INTERFACE
        )
        try:
            records = self._conn.getAllDomainStats(groups, 0)
        except libvirt.libvirtError as exc:
            raise VirtError(f"cannot read domain statistics: {error_message(exc)}") from exc
        return [(dom.name(), dom.UUIDString(), dict(record)) for dom, record in records]

    def lookup_uuid(self, uuid: str) -> Any:  # noqa: ANN401 - libvirt.virDomain has no stubs
        """The raw libvirt domain with this UUID (for Domain after a reconnect)."""
        return self._conn.lookupByUUIDString(uuid)

    def domains(self) -> list[DomainObservation]:
        """Return every domain, active and inactive, sorted by name.

        A domain that disappears while it is being read is left out.

        Raises:
            VirtError: The domains cannot be listed.
        """
        try:
            found = self._conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise VirtError(f"cannot list domains: {error_message(exc)}") from exc
        result = []
        for dom in found:
            try:
                result.append(observe_domain(dom))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue
                raise VirtError(f"cannot read domain: {error_message(exc)}") from exc
        return sorted(result, key=lambda d: d.name)

    def domain(self, name: str) -> Domain:
        """Look a domain up by name.

        Raises:
            VirtError: There is no such domain.
        """
        try:
            return Domain(self._conn.lookupByName(name), self)
        except libvirt.libvirtError as exc:
            raise VirtError(f"domain {name!r}: {error_message(exc)}") from exc

    def domain_by_uuid(self, uuid: str) -> Domain:
        """Look a domain up by UUID.

        Raises:
            VirtError: There is no such domain.
        """
        try:
            return Domain(self.lookup_uuid(uuid), self)
        except libvirt.libvirtError as exc:
            raise VirtError(f"domain {uuid}: {error_message(exc)}") from exc
