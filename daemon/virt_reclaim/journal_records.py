"""What the journal holds, as Python values: a job and its disks; and its error."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from virt_reclaim.errors import VirtReclaimError


class JournalError(VirtReclaimError):
    """The journal cannot be opened, read or written; no job may run."""


@dataclass(frozen=True)
class JournalDisk:
    """A disk of a job as recovery needs it."""

    target: str
    path: str
    temp_path: str
    backup_path: str | None
    state: str | None = None  # the mode's own record of how far this disk got
    bytes_before: int | None = None
    bytes_after: int | None = None
    estimated_after: int | None = None
    guest_used: int | None = None
    data: dict[str, Any] | None = None  # what the mode needs to recover this disk


@dataclass(frozen=True)
class JournalJob:
    """A job as the journal holds it."""

    id: str
    domain: str
    domain_uuid: str
    previous_state: str | None
    started_at: float
    finished_at: float | None
    step: str | None
    outcome: str | None
    reason: str | None
    bytes_before: int | None
    bytes_after: int | None
    downtime_s: float | None
    duration_s: float | None
    disks: tuple[JournalDisk, ...]
    steps: tuple[str, ...]
    mode: str = "offline"
    estimated_after: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The job as ``history --json`` prints it."""
        return {
            "job_id": self.id,
            "domain": self.domain,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "outcome": self.outcome,
            "reason": self.reason,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "estimated_after": self.estimated_after,
            "mode": self.mode,
            "downtime_s": self.downtime_s,
            "duration_s": self.duration_s,
            "steps": list(self.steps),
        }


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
