"""What the daemon's main loop knows of libvirt: the connection, its outages, the domains.

The connection is opened (and, after an outage, reopened with backoff) by the
main loop; libvirt's event loop thread only reports through the callbacks given
to ``connect``, which must hand the news over to the main loop. The domains are
kept current by ``update`` (lifecycle events) and carry the statistics samples
that ``sample`` takes for the idle checks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from virt_reclaim.errors import VirtError
from virt_reclaim.service import idle
from virt_reclaim.service.eligibility import DomainView
from virt_reclaim.virt.connection import Hypervisor

RECONNECT_MAX_DELAY_S = 60.0
SLOW_SAMPLE_MS = 1000.0

log = structlog.get_logger("virt_reclaim.service")


@dataclass
class Outage:
    """libvirtd unreachable: since when, and when to try again."""

    since: float
    reason: str
    attempts: int = 0
    next_try: float = 0.0
    delay: float = 0.5

    def failed(self, now: float) -> None:
        """One more attempt failed at ``now``: wait twice as long (up to a minute) for the next."""
        self.attempts += 1
        self.next_try = now + self.delay
        self.delay = min(self.delay * 2, RECONNECT_MAX_DELAY_S)


class HostView:
    """The connection to libvirtd (or the outage), and the domains it lists, by uuid."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.uri = ""
        self.hypervisor: Hypervisor | None = None
        self.outage: Outage | None = None
        self.domains: dict[str, DomainView] = {}
        self.sampled_once = False
        self.last_sampled_at: float | None = None  # wall clock of the last sample that worked

    def connect(
        self,
        uri: str,
        *,
        on_lifecycle: Callable[[str, str, str], None],
        on_close: Callable[[str], None],
    ) -> bool:
        """Keep a live connection: notice a dead one, reconnect when the backoff allows.

        Returns True when the connection came back after an outage (in this call).
        """
        if self.hypervisor is not None:
            if self.hypervisor.alive():
                return False
            self.lost("the connection is dead")
        outage = self.outage
        now = self.clock()
        if outage is not None and now < outage.next_try:
            return False
        self.uri = uri
        try:
            hypervisor = Hypervisor(uri)
            hypervisor.watch(on_lifecycle=on_lifecycle, on_close=on_close)
            listed = hypervisor.domains()
        except VirtError as exc:
            if outage is None:
                outage = self.outage = Outage(since=now, reason=str(exc))
                log.warning("libvirt.unreachable", uri=uri, error=str(exc))
            outage.failed(now)
            return False
        self.hypervisor = hypervisor
        self.domains = {s.uuid: self.domains.get(s.uuid, DomainView(s)) for s in listed}
        for observed in listed:
            self.domains[observed.uuid].observed = observed
        if outage is not None:
            log.info("libvirt.reconnected", uri=uri,
                     outage_s=round(now - outage.since, 1), attempts=outage.attempts)  # fmt: skip
            self.outage = None
            return True
        log.info("libvirt.connected", uri=uri, domains=len(listed))
        return False

    def lost(self, reason: str) -> None:
        """The connection is gone: close it, and start an outage (logged once per outage)."""
        if self.hypervisor is not None:
            self.hypervisor.close()
            self.hypervisor = None
        if self.outage is None:
            # Logged once per outage; the reconnect logs how long it lasted.
            log.warning("libvirt.disconnected", uri=self.uri, reason=reason)
            self.outage = Outage(since=self.clock(), reason=reason)

    def closed(self, reason: str) -> None:
        """The connection closed (libvirt says): an outage, unless it is alive after all."""
        if self.hypervisor is not None and not self.hypervisor.alive():
            self.lost(reason)

    def update(self, uuid: str, name: str, event: str) -> None:
        """A lifecycle event of domain ``uuid``: read it again, or forget it if it is gone."""
        if self.hypervisor is None:
            return
        try:
            observed = self.hypervisor.domain_by_uuid(uuid).observe()
        except VirtError:
            if self.domains.pop(uuid, None) is not None:
                log.info("domain.gone", domain=name, libvirt_event=event)
            return
        view = self.domains.get(uuid)
        if view is None:
            self.domains[uuid] = DomainView(observed)
            log.info("domain.added", domain=name, state=str(observed.state), libvirt_event=event)
        else:
            view.observed = observed

    def sample(self, now: float, keep_s: float) -> None:
        """One statistics call for all domains; each keeps the samples of the last ``keep_s``."""
        if self.hypervisor is None:
            return
        began = time.perf_counter()
        try:
            records = self.hypervisor.domain_stats()
        except VirtError as exc:
            log.warning("stats.failed", error=str(exc))
            return
        self.last_sampled_at = time.time()
        for _name, uuid, record in records:
            view = self.domains.get(uuid)
            if view is None:
                continue
            view.recent.duration_s = keep_s
            view.recent.add(idle.sample_from_stats(record, now))
        took_ms = (time.perf_counter() - began) * 1000
        # The first sample tells the operator what sampling costs on this host; later ones
        # are logged only when they hold the main loop up.
        if not self.sampled_once or took_ms > SLOW_SAMPLE_MS:
            emit = log.warning if took_ms > SLOW_SAMPLE_MS else log.info
            emit("stats.sampled", domains=len(records), duration_ms=round(took_ms, 1))
            self.sampled_once = True

    def close(self) -> None:
        """Close the connection (at the daemon's end)."""
        if self.hypervisor is not None:
            self.hypervisor.close()
