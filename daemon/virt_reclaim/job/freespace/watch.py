"""The watches over what a job writes: they stop it the moment the host is at risk.

The fill's byte limit, and the preflight's bound of a rewrite, keep the host above
its reserve when nothing else writes; the watches cover what a bound cannot know:
another guest or program writing to the same filesystem, or (during a fill) the
guest paused by QEMU after an I/O error (ENOSPC on the host).
"""

from __future__ import annotations

import contextvars
import threading
from types import TracebackType
from typing import Self

import structlog

from virt_reclaim.errors import VirtError
from virt_reclaim.job.freespace import budget
from virt_reclaim.job.ports import DomainPort
from virt_reclaim.model import DomainState
from virt_reclaim.units import format_bytes

POLL_S = 0.25


class _Watch:
    """A thread that, once entered, checks every ``poll_s`` until the block ends.

    It sets ``stop`` when the job stops (``why`` stays None) or when ``_check`` names a
    reason (``why``, which ``_tripped`` logs).
    """

    def __init__(self, job_stop: threading.Event | None, poll_s: float, name: str) -> None:
        self.stop = threading.Event()
        self.why: str | None = None
        self._job_stop = job_stop
        self._poll_s = poll_s
        self._done = threading.Event()
        # A copy of the context, so that its events say which job and domain they are about.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._watch,), name=name, daemon=True
        )
        self._log = structlog.get_logger("virt_reclaim.fillwatch")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _check(self) -> str | None:
        raise NotImplementedError

    def _tripped(self, why: str) -> None:
        raise NotImplementedError

    def _watch(self) -> None:
        while not self._done.wait(self._poll_s):
            if self._job_stop is not None and self._job_stop.is_set():
                self.stop.set()
                return
            why = self._check()
            if why is not None:
                self.why = why
                self._tripped(why)
                self.stop.set()
                return


class FillWatch(_Watch):
    """Sets ``stop`` when the job stops, a host filesystem is below its floor, or QEMU pauses.

    ``why`` says which (None when the job itself stopped); ``paused`` tells the last.
    """

    def __init__(
        self,
        fill_budget: budget.FillBudget,
        domain: DomainPort,
        job_stop: threading.Event | None,
        poll_s: float = POLL_S,
    ) -> None:
        """Watch ``fill_budget``'s host filesystems and ``domain`` once entered."""
        super().__init__(job_stop, poll_s, "fill-watch")
        self.paused = False
        self._budget = fill_budget
        self._domain = domain

    def _check(self) -> str | None:
        low = budget.below_floor(self._budget)
        if low is not None:
            return low
        try:
            state = self._domain.state()
        except VirtError:
            return None  # libvirtd restarting: the floors are still watched
        if state is DomainState.PAUSED:
            self.paused = True
            return f"QEMU paused it; {self._fullest()}"
        return None

    def _tripped(self, why: str) -> None:
        self._log.warning("free_space.watch_tripped", reason=why)

    def _fullest(self) -> str:
        parts = []
        for folder, floor in self._budget.floors.values():
            free = budget.host_filesystem(folder).free
            parts.append(
                f"the host filesystem of {folder} has {format_bytes(free)} free "
                f"(floor {format_bytes(floor)})"
            )
        return "; ".join(parts) or "a host filesystem is likely full"


class RewriteWatch(_Watch):
    """Sets ``stop`` when the job stops or the image's host filesystem is below its reserve.

    The rewrite passes ``stop`` to qemu-img convert, which is then killed; ``why`` says
    what tripped it (None when the job itself stopped).
    """

    def __init__(
        self, folder: str, reserve: int, job_stop: threading.Event | None, poll_s: float = POLL_S
    ) -> None:
        """Watch the filesystem of ``folder`` against ``reserve`` bytes once entered."""
        super().__init__(job_stop, poll_s, "rewrite-watch")
        self._folder = folder
        self._reserve = reserve

    def _check(self) -> str | None:
        free = budget.host_filesystem(self._folder).free
        if free >= self._reserve:
            return None
        return (
            f"the host filesystem of {self._folder} fell to {format_bytes(free)} free, "
            f"below its reserve of {format_bytes(self._reserve)}"
        )

    def _tripped(self, why: str) -> None:
        self._log.warning("rewrite.watch_tripped", reason=why)


class LiveWatch(_Watch):
    """Sets ``stop`` when the job stops or a live job's host filesystem is below its reserve.

    ``floors`` maps a filesystem's device to (a folder on it, its reserve). The live mode
    hands ``stop`` to the rewrite as its own stop, and reads ``why`` between its steps.
    """

    def __init__(
        self,
        floors: dict[int, tuple[str, int]],
        job_stop: threading.Event | None,
        poll_s: float = POLL_S,
    ) -> None:
        """Watch every filesystem of ``floors`` once entered."""
        super().__init__(job_stop, poll_s, "live-watch")
        self._floors = floors

    def _check(self) -> str | None:
        for folder, reserve in self._floors.values():
            free = budget.host_filesystem(folder).free
            if free < reserve:
                return (
                    f"the host filesystem of {folder} fell to {format_bytes(free)} free, "
                    f"below its reserve of {format_bytes(reserve)}"
                )
        return None

    def _tripped(self, why: str) -> None:
        self._log.warning("live.watch_tripped", reason=why)
