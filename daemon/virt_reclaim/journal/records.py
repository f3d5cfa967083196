"""What the journal holds, as Python values: a job and its disks; and its error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from virt_reclaim.errors import VirtReclaimError
from virt_reclaim.units import iso_time


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
class BackupRecord:
    """An original image kept beside the new one until ``expires_at`` (epoch seconds).

    ``device`` and ``inode`` are the file's when it was kept: a path that holds
    another file at expiry is not ours to delete.
    """

    path: str
    job_id: str
    domain: str
    target: str
    device: int
    inode: int
    bytes: int  # what it held on the host when kept
    created_at: float
    expires_at: float
    removed_at: float | None = None
    removed_why: str | None = None

    def to_json(self, held_bytes: int | None = None) -> dict[str, Any]:
        """The backup as ``backups --json`` prints it; ``held_bytes`` as measured now."""
        return {
            "domain": self.domain,
            "target": self.target,
            "path": self.path,
            "job_id": self.job_id,
            "bytes": self.bytes if held_bytes is None else held_bytes,
            "kept_at": iso_time(self.created_at),
            "expires_at": iso_time(self.expires_at),
            "removed_at": iso_time(self.removed_at),
            "removed_why": self.removed_why,
        }


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
            "started_at": iso_time(self.started_at),
            "finished_at": iso_time(self.finished_at),
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


@dataclass(frozen=True)
class DomainActivity:
    """A domain's jobs in the journal, by name: its uuids, when the last one was heard of."""

    name: str
    uuids: frozenset[str]
    last_at: float  # the newest start or end of its jobs (epoch seconds)
    unfinished: bool  # a job without an end: recovery may still need it
