"""systemd's notify protocol (sd_notify): datagrams to $NOTIFY_SOCKET, and the watchdog period.

Written here rather than taken from a library: the protocol is one datagram
per message, and the libraries for it are unmaintained or need libsystemd.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog


class Notifier:
    """Sends state changes to systemd; does nothing when not run by systemd (no NOTIFY_SOCKET)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        """Read $NOTIFY_SOCKET and $WATCHDOG_USEC (honouring $WATCHDOG_PID) from ``environ``."""
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading "@".
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_s = _watchdog_seconds(env)
        self._last_status = ""
        self._last_watchdog = float("-inf")

    @property
    def enabled(self) -> bool:
        """True when systemd (or a test) listens."""
        return self._socket is not None

    def send(self, *fields: str) -> None:
        """Send ``KEY=value`` fields in one datagram; a lost message is logged, never raised."""
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            structlog.get_logger("virt_reclaim.sdnotify").warning(
                "sdnotify.failed", error=str(exc), message=fields[0] if fields else ""
            )

    def ready(self, status: str) -> None:
        """The service is up (configuration loaded, libvirt answers)."""
        self._last_status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        """What the service does now; sent only when it changed."""
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def reloading(self) -> None:
        """A reload begins; ``ready`` ends it."""
        # systemd >= 253 wants the time of the reload with RELOADING=1 (Type=notify-reload).
        monotonic_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", "STATUS=reloading the configuration",
                  f"MONOTONIC_USEC={monotonic_us}")  # fmt: skip

    def stopping(self, status: str) -> None:
        """The service is stopping."""
        self.send("STOPPING=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more before systemd's start or stop timeout kills the service.

        systemd (>= 236) counts from this message: a service that keeps sending it while
        it makes progress is given the time it needs, one that goes silent is not.
        """
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog(self) -> None:
        """Tell the watchdog the main loop is alive."""
        self.send("WATCHDOG=1")

    def watchdog_if_due(self, now: float, *, healthy: bool) -> None:
        """Feed the watchdog, four times a period, while the daemon is ``healthy``.

        ``now`` is monotonic seconds. Unhealthy (libvirt's event loop died), it goes silent
        so that systemd restarts the service.
        """
        period = self.watchdog_s
        if period and healthy and now - self._last_watchdog >= period / 4:
            self.watchdog()
            self._last_watchdog = now

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """The watchdog period systemd set for this process, or None."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None
