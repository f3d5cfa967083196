"""What the steps of a job share: the ports, the settings, the disks, and the step machinery.

Each step is taken inside ``JobContext.step``: recorded in the journal before it
is taken, logged when it starts and ends, refused once the job is asked to stop
(except the steps that must finish once begun), and a cancelled tool turns into
an abandoned job.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import structlog

from virt_reclaim import backups
from virt_reclaim.domxml.read import DomainSpec
from virt_reclaim.errors import Cancelled, JobOutcome
from virt_reclaim.image import imagefile
from virt_reclaim.image.guard import ImageGuard
from virt_reclaim.image.qemu_img_argv import ImageInfo
from virt_reclaim.image.sizing import SizeEstimate
from virt_reclaim.job.freespace import budget
from virt_reclaim.job.freespace.agent import Choice
from virt_reclaim.job.ports import DomainPort, ImagePort
from virt_reclaim.job.results import DiskResult, JobAbandoned, SkippedDisk
from virt_reclaim.job.settings import JobSettings
from virt_reclaim.journal.records import BackupRecord, JournalError
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import AgentInfo, GuestFilesystem
from virt_reclaim.units import iso_time


class Step(enum.StrEnum):
    """The steps of a job, as the journal and the log name them."""

    INSPECT = "inspect"
    ESTIMATE = "estimate"
    PREFLIGHT = "preflight"
    FREE_SPACE = "free-space"
    SHUTDOWN = "shutdown"
    GUARD = "guard"
    REWRITE = "rewrite"
    VERIFY = "verify"
    SWAP = "swap"
    # The persistent definition changed while the guest is off (discard turned on, a
    # converted disk pointed at its new image):
    DEFINE = "define"
    RESTORE = "restore"
    # The live mode's own (after REWRITE, VERIFY and SWAP of the snapshotted base):
    SNAPSHOT = "snapshot"
    COPY = "copy"
    COMMIT = "commit"
    CLEANUP = "cleanup"  # also the convert mode's: the originals removed once the guest runs


# Recorded in the journal (not a step of its own) once the guest was asked to stop.
SHUTDOWN_REQUESTED = "shutdown-requested"
# Steps that run to their end even when the job is asked to stop: the swap is quick and
# bringing the guest back is the point of stopping safely.
# In the live mode, once the base is swapped the only safe way is forward.
FINISH_ONCE_BEGUN = frozenset(
    {Step.SWAP, Step.DEFINE, Step.RESTORE, Step.COPY, Step.COMMIT, Step.CLEANUP}
)


@dataclass(frozen=True)
class Measured:
    """``qemu-img measure`` of an image, and the stamp of its file when it was measured."""

    stamp: tuple[int, ...]
    bytes: int


@dataclass
class DiskWork:
    """One disk being reclaimed, and what the job learns of it step by step."""

    target: str
    path: str
    discard: bool
    zeros_become_holes: bool
    info: ImageInfo
    temp: str  # planned (and journaled) before anything changes
    backup: str | None  # where --keep-backup keeps the original
    bytes_before: int = 0
    estimated_after: int | None = None
    bytes_after: int | None = None
    swapped: bool = False
    new: imagefile.NewImage | None = None  # the file at ``temp``, once the rewrite made it
    freed_in_place: bool = False  # the free-space step alone freed it (no rewrite)
    rewrite_need: int = 0  # qemu-img measure: what the rewrite may write at most
    measured: Measured | None = None  # the last measure (steps.preflight reuses it)
    zeroed_bytes: int = 0  # zeros our fill wrote into filesystems on this disk
    guest_used: int | None = None  # bytes the guest's filesystems on it use
    estimate: SizeEstimate | None = None
    format: str = "qcow2"  # the image format the domain XML states (never probed)
    converted_path: str | None = None  # where a raw or VMDK image is converted to (qcow2)
    data_file: str | None = None  # a flat VMDK's extent: the file its guest data is in
    cluster_size: int | None = None  # the new image's
    discard_enabled: bool = False  # the job turned discard on in the definition
    # The original (and a flat VMDK's extent), kept as backups until they expire.
    kept: list[BackupRecord] = field(default_factory=list)

    def new_image(self) -> imagefile.NewImage:
        """The file the rewrite made for this disk (the rewrite came first)."""
        if self.new is None:
            raise RuntimeError(f"{self.target}: no new image: the rewrite did not run")
        return self.new

    def allocated(self) -> int:
        """Bytes the image occupies on the host now (a flat VMDK's extent included)."""
        extra = imagefile.allocated_bytes(self.data_file) if self.data_file else 0
        return imagefile.allocated_bytes(self.path) + extra

    def result(self) -> DiskResult:
        """The disk's entry in the job's result."""
        return DiskResult(
            target=self.target,
            path=self.path,
            virtual_size=self.info.virtual_size,
            bytes_before=self.bytes_before,
            bytes_after=self.bytes_after,
            estimated_after=self.estimated_after,
            estimate_basis=self.estimate.basis if self.estimate else None,
            guest_used=self.guest_used,
            backup=self.backup if self.swapped else None,
            backup_bytes=sum(k.bytes for k in self.kept) if self.kept else None,
            backup_expires_at=self.kept[0].expires_at if self.kept else None,
            format=self.format,
            converted_to=self.converted_path if self.swapped else None,
            discard=self.discard,
            discard_enabled=self.discard_enabled,
            cluster_size=self.cluster_size,
        )


@dataclass
class JobContext:
    """The state of one job that its steps read and fill in."""

    domain: DomainPort
    images: ImagePort
    settings: JobSettings
    job_id: str
    images_of_other_domains: Callable[[], dict[str, str]]
    clock: Callable[[], float] = time.monotonic
    journal: Journal | None = None
    before_step: Callable[[Step], None] | None = None
    stop: threading.Event | None = None
    on_progress: Callable[[str, float], None] | None = None
    # (domain uuid, target, compression) -> bytes after per used byte of its last reclaim;
    # the journal's by default, given separately to dry runs, which journal nothing.
    history: Callable[[str, str, str], float | None] | None = None
    started_wall: float = field(default_factory=time.time)
    disks: list[DiskWork] = field(default_factory=list)
    skipped_disks: list[SkippedDisk] = field(default_factory=list)
    was_running: bool = False
    # The persistent definition, parsed where it was last read: by inspect, and again by
    # the guard once the guest is off (it may have been edited meanwhile). The define
    # step reads it once more right before replacing it.
    definition: DomainSpec | None = None
    live: bool = False  # the live mode keeps it running: its overlays are reserved too
    agent_connected: bool = False
    agent: AgentInfo | None = None
    choice: Choice | None = None
    guest_filesystems: list[GuestFilesystem] = field(default_factory=list)
    fill_budget: budget.FillBudget | None = None
    free_space: str | None = None  # what the free-space step did
    guard: ImageGuard = field(default_factory=ImageGuard)
    down_since: float | None = None
    downtime: float = 0.0

    def __post_init__(self) -> None:
        self.log = structlog.get_logger("virt_reclaim.job").bind(
            domain=self.domain.name, job_id=self.job_id
        )
        if self.settings.dry_run:
            # Estimates (plan, the daemon's queue) must not look like jobs to log alerts.
            self.log = self.log.bind(dry_run=True)

    def record_disk(
        self,
        disk: DiskWork,
        *,
        bytes_before: int | None = None,
        bytes_after: int | None = None,
        estimated_after: int | None = None,
        guest_used: int | None = None,
    ) -> None:
        """Journal a disk's figures (a no-op without a journal); None leaves one as it was."""
        if self.journal is not None:
            self.journal.record_disk(
                self.job_id, disk.target, bytes_before=bytes_before, bytes_after=bytes_after,
                estimated_after=estimated_after, guest_used=guest_used,
            )  # fmt: skip

    def keep_backup(self, disk: DiskWork, path: str) -> None:
        """Journal ``path``, the disk's original, as a backup that expires per the settings."""
        kept = backups.keep(
            self.journal, path=path, job_id=self.job_id, domain=self.domain.name,
            target=disk.target, keep_s=self.settings.keep_backup or 0.0,
        )  # fmt: skip
        disk.kept.append(kept)
        self.log.info("backup.kept", target=disk.target, path=path, bytes=kept.bytes,
                      expires_at=iso_time(kept.expires_at))  # fmt: skip

    def mark(self, name: str) -> None:
        """Journal a point inside a step that recovery must know of (no step of its own)."""
        if self.journal is not None:
            self.journal.enter_step(self.job_id, name)

    @contextmanager
    def step(self, step: Step) -> Iterator[None]:
        """Take ``step``: journaled first, logged, refused once stopping (see module doc)."""
        if self.stop is not None and self.stop.is_set() and step not in FINISH_ONCE_BEGUN:
            self.log.info("job.abandoned", step=str(step))
            raise JobAbandoned(f"stopped before step {step}: the service is stopping")
        if self.journal is not None:
            try:
                self.journal.enter_step(self.job_id, str(step))
            except JournalError as exc:
                if step is not Step.RESTORE:
                    raise
                # The guest's power matters more than the record of bringing it back.
                self.log.error("step.not_journaled", step=str(step), error=str(exc))
        if self.before_step is not None:
            self.before_step(step)
        began = self.clock()
        self.log.info("step.started", step=str(step))
        try:
            yield
        except Cancelled as exc:
            self.log.info("job.abandoned", step=str(step))
            raise JobAbandoned(f"stopped during step {step}: the service is stopping") from exc
        except JobOutcome as exc:  # not a failure of the step: it ends the job (FreedInPlace too)
            self.log.info("step.finished", step=str(step), result=str(exc),
                          duration_s=round(self.clock() - began, 3))  # fmt: skip
            raise
        except BaseException as exc:
            self.log.warning("step.failed", step=str(step), error=str(exc) or type(exc).__name__,
                             duration_s=round(self.clock() - began, 3))  # fmt: skip
            raise
        self.log.info("step.finished", step=str(step), duration_s=round(self.clock() - began, 3))
