"""What the journal holds, as Python values: a job and its disks; and its error."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from virt_reclaim.errors import VirtReclaimError
from virt_reclaim.job.results import Outcome
from virt_reclaim.units import iso_time


class JournalError(VirtReclaimError):
    """The journal cannot be opened, read or written; no job may run."""


class DiskState(enum.StrEnum):
    """How far a disk of a job got, as its mode journals it (``job_disks.state``).

    The values are the journal's: a journal written by any version reads back.
    The offline mode journals none (its step says it all).
    """

    PLANNED = "planned"  # live and convert: nothing changed yet
    # live (job/modes/live.py)
    SNAPSHOTTED = "snapshotted"
    SWAPPING = "swapping"
    SWAPPED = "swapped"
    COPIED = "copied"
    COMMITTED = "committed"
    UNDONE = "undone"
    # convert (job/modes/conversion.py)
    PLACED = "placed"
    DEFINED = "defined"
    CLEAN = "clean"  # both: the job's files are gone (live) or the original (convert)


@dataclass(frozen=True)
class ConversionData:
    """What recovery needs of a disk a convert job converts, journaled before it starts."""

    format: str  # the original's format, as the definition states it (raw, vmdk)
    new_path: str  # where the qcow2 image goes
    data_file: str | None  # a VMDK's extent file beside its descriptor, removed with it
    keep_original: bool  # keep_backup: the original stays after the conversion

    def to_json(self) -> dict[str, Any]:
        """The ``job_disks.data`` JSON object (``convert: true`` marks a conversion)."""
        return {
            "convert": True,
            "format": self.format,
            "new_path": self.new_path,
            "data_file": self.data_file,
            "keep_original": self.keep_original,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> ConversionData | None:
        """The record of a ``job_disks.data`` object; None when it is not a conversion's."""
        if not value.get("convert"):
            return None
        data_file = value.get("data_file")
        return cls(
            format=str(value["format"]),
            new_path=str(value["new_path"]),
            data_file=None if data_file is None else str(data_file),
            keep_original=bool(value.get("keep_original")),
        )


# What a mode journals for a disk to recover it: only a conversion needs more than the paths.
DiskData = ConversionData


@dataclass(frozen=True)
class JournalDisk:
    """A disk of a job as recovery needs it."""

    target: str
    path: str
    temp_path: str
    backup_path: str | None
    state: DiskState | None = None  # the mode's own record of how far this disk got
    bytes_before: int | None = None
    bytes_after: int | None = None
    estimated_after: int | None = None
    guest_used: int | None = None
    data: DiskData | None = None  # what the mode needs to recover this disk


@dataclass(frozen=True)
class DiskFigures:
    """A disk's newest estimate and newest reclaim in the journal (the metrics' figures).

    The estimate's fields are None when no job estimated the disk, the reclaim's when
    no reclaim rewrote it.
    """

    domain: str
    target: str
    estimated_at: float | None = None  # when the newest estimating job started
    bytes_before: int | None = None
    estimated_after: int | None = None
    reclaimed_at: float | None = None  # when the newest reclaim of it ended
    bytes_after: int | None = None


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
    outcome: Outcome | None  # None: no end recorded (running, or left to recovery)
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
