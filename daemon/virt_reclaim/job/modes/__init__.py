"""Modes of a job: what happens after the shared steps (inspect, estimate, preflight, free space).

A mode owns its steps and the recovery of each step it journals; the frame
(``job/frame.py``) runs it, and restores the guest's power state whatever happens.
The mode a job takes is decided once, by ``decide``, right after inspect; the rest
of the job asks the chosen mode object (``stops_the_guest``) and never its name.
"""

from __future__ import annotations

from typing import Protocol

from virt_reclaim.job.context import JobContext
from virt_reclaim.job.ports import DomainLookup
from virt_reclaim.job.results import Recovered
from virt_reclaim.job.settings import ModeName
from virt_reclaim.journal.records import JournalJob


class JobMode(Protocol):
    """A way to reclaim: its steps, and how to finish or undo them after a crash."""

    name: ModeName
    # Whether its steps shut a running guest down (the before_shutdown hook runs first);
    # a mode that does not keeps it running, and inspect holds its disks to that.
    stops_the_guest: bool

    def run(self, job: JobContext) -> None:
        """Take the mode's steps; on any failure leave the images as they were and raise."""

    def after_restore(self, job: JobContext) -> None:
        """Take the mode's steps that wait for the guest to be back (most have none)."""

    def recover(
        self, journaled: JournalJob, result: Recovered, lookup_domain: DomainLookup
    ) -> None:
        """Finish or undo what a dead job of this mode did to its disks; say so in ``result``.

        ``lookup_domain`` gives the domain (``virt.Domain``) by UUID.
        """


def mode_of(name: ModeName | str) -> JobMode:
    """The mode a job's settings or a journal entry names.

    Raises:
        ValueError: No such mode.
    """
    from virt_reclaim.job.modes.convert import ConvertMode  # noqa: PLC0415 - modes import this module
    from virt_reclaim.job.modes.live import LiveMode  # noqa: PLC0415
    from virt_reclaim.job.modes.offline import OfflineMode  # noqa: PLC0415

    try:
        kind = ModeName(name)
    except ValueError:
        known = ", ".join(ModeName)
        raise ValueError(f"unknown mode {str(name)!r} (known: {known})") from None
    modes: dict[ModeName, JobMode] = {
        ModeName.OFFLINE: OfflineMode(),
        ModeName.LIVE: LiveMode(),
        ModeName.CONVERT: ConvertMode(),
    }
    return modes[kind]


def decide(job: JobContext, asked: JobMode) -> JobMode:
    """The mode the job takes, from the one ``asked`` for and what inspect found.

    The only place a job's mode is chosen; a change is logged and journaled (recovery
    reads the journaled mode). A mode that keeps the guest running has nothing to keep
    running in a shut-off guest: the offline steps cost no downtime then. An offline
    job with a disk to convert (``rewrite.convert``) takes the convert mode.
    """
    chosen = asked
    if not asked.stops_the_guest and not job.was_running:
        chosen = mode_of(ModeName.OFFLINE)
        job.log.info("job.mode_fallback", mode=str(chosen.name), reason="the guest is shut off")
    converting = [d for d in job.disks if d.converted_path]
    if converting and chosen.name is ModeName.OFFLINE:
        chosen = mode_of(ModeName.CONVERT)
        reason = "; ".join(f"{d.target}: {d.format} -> {d.converted_path}" for d in converting)
        job.log.info("job.mode_changed", mode=str(chosen.name), reason=reason)
    if chosen is not asked and job.journal is not None:
        job.journal.set_mode(job.job_id, str(chosen.name))
    return chosen
