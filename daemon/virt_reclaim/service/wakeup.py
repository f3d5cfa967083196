"""What wakes the daemon's main loop: a message from another thread, or a signal.

Signal handlers only set flags; ``signal.set_wakeup_fd`` writes to the socket pair
that ``Wakeup.wake`` writes to, so that the loop's wait ends at once either way.
"""

from __future__ import annotations

import contextlib
import selectors
import signal
import socket
from dataclasses import dataclass
from types import FrameType


@dataclass
class Flags:
    """What the signal handlers ask for."""

    reload: bool = False
    stop: bool = False
    signal_name: str = ""


class Wakeup:
    """A socket pair the main loop waits on; other threads and signals write to it."""

    def __init__(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)

    def wake(self) -> None:
        """End the main loop's wait (from any thread)."""
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")

    def wait(self, timeout: float) -> None:
        """Wait until woken, or for ``timeout`` seconds."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            if selector.select(max(0.0, timeout)):
                with contextlib.suppress(BlockingIOError):
                    while self._wake_r.recv(4096):
                        pass

    def install_signal_handlers(self, flags: Flags) -> None:
        """SIGTERM and SIGINT set ``flags.stop``, SIGHUP ``flags.reload`` (main thread only)."""
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

        def on_stop(signum: int, _frame: FrameType | None) -> None:
            flags.stop = True
            flags.signal_name = signal.Signals(signum).name

        def on_reload(_signum: int, _frame: FrameType | None) -> None:
            flags.reload = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)
