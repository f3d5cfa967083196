"""How a job ends: its outcome, the exceptions that end it early, and its typed result."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from virt_reclaim.errors import JobOutcome, VirtReclaimError
from virt_reclaim.job.settings import ModeName
from virt_reclaim.units import iso_time


class Outcome(enum.StrEnum):
    """How a job ended."""

    RECLAIMED = "reclaimed"
    NOTHING_TO_DO = "nothing-to-do"
    DRY_RUN = "dry-run"
    SKIPPED = "skipped"
    FAILED = "failed"
    ABANDONED = "abandoned"  # stopped (daemon shutting down); everything as it was


class JobSkipped(JobOutcome):
    """The domain or its disks are not eligible; nothing was changed."""


class SpaceTaken(JobSkipped):
    """The job's writes fit on the host filesystem, but not beside other jobs' reservations.

    Nothing was changed; the daemon queues the domain again for when those jobs end.
    """


class NothingToDo(JobOutcome):
    """The estimated gain is below the minimum; nothing was changed."""


class FreedInPlace(JobOutcome):
    """The free-space step alone freed the space (a trim through discard): no rewrite needed.

    A success, not a ``NothingToDo``: the job ends ``reclaimed`` with no downtime; the
    disks' ``bytes_after`` are what they occupy now.
    """


class JobFailed(VirtReclaimError):
    """The job could not finish; everything was restored."""


class JobUnfinished(JobFailed):
    """The job failed where it cannot be undone at once (a live job after its swap).

    Its journal entry stays unfinished, so that recovery finishes it.
    """


class JobAbandoned(JobOutcome):
    """The job was asked to stop before the swap; everything was restored."""


@dataclass(frozen=True)
class DiskResult:
    """One disk's figures at the end of a job (``run --json``'s ``disks`` entries)."""

    target: str
    path: str
    virtual_size: int
    bytes_before: int
    bytes_after: int | None
    estimated_after: int | None
    estimate_basis: str | None
    guest_used: int | None
    backup: str | None
    backup_bytes: int | None = None  # what the backup holds on the host until it expires
    backup_expires_at: float | None = None  # epoch seconds
    format: str = "qcow2"  # the image's format before the job
    converted_to: str | None = None  # the qcow2 image a raw or VMDK disk was converted to
    discard: bool = True  # the definition had discard='unmap' when the job began
    discard_enabled: bool = False  # the job turned discard on (guest.enable_discard)
    cluster_size: int | None = None  # the new image's cluster size

    def to_json(self) -> dict[str, Any]:
        """The disk as ``run --json`` prints it."""
        return {
            "target": self.target,
            "path": self.path,
            "virtual_size": self.virtual_size,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "estimated_after": self.estimated_after,
            "estimate_basis": self.estimate_basis,
            "guest_used": self.guest_used,
            "backup": self.backup,
            "backup_bytes": self.backup_bytes,
            "backup_expires_at": iso_time(self.backup_expires_at),
            "format": self.format,
            "converted_to": self.converted_to,
            "discard": self.discard,
            "discard_enabled": self.discard_enabled,
            "cluster_size": self.cluster_size,
        }


@dataclass(frozen=True)
class SkippedDisk:
    """A disk the job left alone, and why."""

    target: str
    path: str
    reason: str

    def to_json(self) -> dict[str, str]:
        """The disk as ``run --json`` prints it in ``skipped_disks``."""
        return {"target": self.target, "path": self.path, "reason": self.reason}


@dataclass
class JobResult:
    """How the job ended, with figures; ``to_json`` is the documented output."""

    domain: str
    job_id: str
    outcome: Outcome
    reason: str
    downtime_s: float
    duration_s: float
    disks: list[DiskResult]
    skipped_disks: list[SkippedDisk]
    free_space: str | None
    free_space_plan: str | None = None  # the method chosen, and why ("none (...)")
    mode: ModeName = ModeName.OFFLINE  # the mode the job took (modes.decide)
    # Skipped only because other jobs hold the host's space reserved: worth another try.
    waits_for_space: bool = False

    def to_json(self) -> dict[str, Any]:
        """The JSON object printed by ``run --json``."""
        return {
            "domain": self.domain,
            "job_id": self.job_id,
            "mode": str(self.mode),
            "outcome": str(self.outcome),
            "reason": self.reason,
            "downtime_s": round(self.downtime_s, 3),
            "duration_s": round(self.duration_s, 3),
            "disks": [d.to_json() for d in self.disks],
            "skipped_disks": [d.to_json() for d in self.skipped_disks],
            "free_space": self.free_space,
            "free_space_plan": self.free_space_plan,
        }


@dataclass(frozen=True)
class DiskFound:
    """What recovery saw of one disk of a live job before it acted (``recover --json``).

    The chains are the disk's images top first, as the live and the persistent
    definition name them; ``files`` are the job's files that exist beside the image;
    ``swapped`` whether the image's path holds another file than the one QEMU reads
    (the new image was renamed over it), None when QEMU reads none of it.
    """

    target: str
    live_chain: tuple[str | None, ...]
    persistent_chain: tuple[str | None, ...]
    block_job: str | None
    files: tuple[str, ...]
    swapped: bool | None

    def to_json(self) -> dict[str, Any]:
        """The disk's entry under ``found`` in ``recover --json``."""
        return {
            "target": self.target,
            "live_chain": list(self.live_chain),
            "persistent_chain": list(self.persistent_chain),
            "block_job": self.block_job,
            "files": list(self.files),
            "swapped": self.swapped,
        }


class RecoveryOutcome(enum.StrEnum):
    """How recovery left a job: ``recover --json``'s ``outcome``, the journal's once finished."""

    RECLAIMED = "reclaimed"  # every disk done: the job is finished as reclaimed
    FAILED = "failed"  # finished, the disks undone (or some left as they were)
    UNFINISHED = "unfinished"  # could not be ended now: tried again at the next recovery


@dataclass
class Recovered:
    """What recovery found and did for one job that its process left unfinished."""

    job_id: str
    domain: str
    step: str | None
    outcome: RecoveryOutcome
    actions: list[str]
    found: list[DiskFound] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The entry of ``recover --json``."""
        return {
            "job_id": self.job_id,
            "domain": self.domain,
            "step": self.step,
            "outcome": str(self.outcome),
            "actions": self.actions,
            "found": [disk.to_json() for disk in self.found],
        }
