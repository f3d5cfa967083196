"""Modes of a job: what happens after the shared steps (inspect, estimate, preflight, free space).

A mode owns its steps and the recovery of each step it journals; the frame
(``job.py``) runs it, and restores the guest's power state whatever happens.
"""

from __future__ import annotations

from typing import Protocol

from virt_reclaim.job.context import JobContext
from virt_reclaim.job.ports import DomainLookup
from virt_reclaim.job.results import Recovered
from virt_reclaim.journal.records import JournalJob


class JobMode(Protocol):
    """A way to reclaim: its steps, and how to finish or undo them after a crash."""

    name: str
    # Whether its steps shut a running guest down (the before_shutdown hook runs first).
    stops_the_guest: bool

    def run(self, job: JobContext) -> None:
        """Take the mode's steps; on any failure leave the images as they were and raise."""

    def recover(
        self, journaled: JournalJob, result: Recovered, lookup_domain: DomainLookup
    ) -> None:
        """Finish or undo what a dead job of this mode did to its disks; say so in ``result``.

        ``lookup_domain`` gives the domain (``virt.Domain``) by UUID.
        """


def mode_named(name: str) -> JobMode:
    """The mode a policy or a journal entry names.

    Raises:
        ValueError: No such mode.
    """
    from virt_reclaim.job.modes.convert import ConvertMode  # noqa: PLC0415 - modes import this module
    from virt_reclaim.job.modes.live import LiveMode  # noqa: PLC0415
    from virt_reclaim.job.modes.offline import OfflineMode  # noqa: PLC0415

    modes: dict[str, JobMode] = {
        "offline": OfflineMode(),
        "live": LiveMode(),
        "convert": ConvertMode(),
    }
    try:
        return modes[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r} (known: {', '.join(modes)})") from None
