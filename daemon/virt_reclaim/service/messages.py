"""What the other threads tell the daemon's main loop: one frozen record per kind of message.

libvirt's event thread posts ``Lifecycle`` and ``ConnectionClosed``, the scheduler
``Fired``, an estimator thread ``Estimated``, a job thread ``JobDone``; the main loop
alone reads them (``Daemon._handle``). Each carries its ``kind``, the name the logs give it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from virt_reclaim.job.results import Outcome
from virt_reclaim.service.scheduler import Candidate


@dataclass(frozen=True)
class Fired:
    """A policy's schedule fired: its window opens."""

    kind: ClassVar[str] = "fired"
    policy: str


@dataclass(frozen=True)
class Lifecycle:
    """A domain was defined, started, stopped, removed... (libvirt's lifecycle event)."""

    kind: ClassVar[str] = "lifecycle"
    uuid: str
    name: str
    event: str


@dataclass(frozen=True)
class ConnectionClosed:
    """The libvirt connection was lost."""

    kind: ClassVar[str] = "closed"
    reason: str


@dataclass(frozen=True)
class Estimated:
    """The dry runs of a window's domains are done (also when they failed: no candidates)."""

    kind: ClassVar[str] = "estimated"
    policy: str
    candidates: list[Candidate]


@dataclass(frozen=True)
class JobEnd:
    """What the main loop hears of a job's end."""

    outcome: Outcome | None  # None: it could not run, or crashed
    waits_for_space: bool  # skipped while other jobs hold the host's space reserved


@dataclass(frozen=True)
class JobDone:
    """A job thread ended (always posted, whatever happened in it)."""

    kind: ClassVar[str] = "job-done"
    uuid: str
    ended: JobEnd


Message = Fired | Lifecycle | ConnectionClosed | Estimated | JobDone
# How a thread hands a message to the main loop (and wakes it).
Post = Callable[[Message], None]
