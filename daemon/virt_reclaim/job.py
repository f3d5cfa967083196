"""The reclaim job of one domain: an explicit sequence of steps over injected ports.

INSPECT -> ESTIMATE -> PREFLIGHT -> FREE_SPACE -> SHUTDOWN -> GUARD -> PREFLIGHT
-> REWRITE -> VERIFY -> SWAP -> RESTORE. Every step is logged when it starts and
ends. From SHUTDOWN on, any failure (or interrupt) deletes the temporary files,
releases the guard and brings the guest back to the power state it had; the
original image is only ever replaced by a rename after check and compare.
"""

from __future__ import annotations

import contextvars
import enum
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog

from virt_reclaim import domxml, fillplan, imagefile
from virt_reclaim import estimate as estimating
from virt_reclaim.errors import (
    AgentUnavailable,
    Cancelled,
    GuestExecCancelled,
    QemuImgError,
    VirtError,
)
from virt_reclaim.fillplan import Reserve
from virt_reclaim.fillwatch import FillWatch
from virt_reclaim.guard import GuardError, ImageGuard
from virt_reclaim.guestfree import (
    Choice,
    FreeSpaceMethod,
    FreeSpaceResult,
    choose_method,
    freed_share,
    trim,
    zero_fill,
)
from virt_reclaim.journal import Journal, JournalDisk, JournalError
from virt_reclaim.model import AgentInfo, DomainState, GuestFilesystem
from virt_reclaim.ports import DomainPort, ImagePort
from virt_reclaim.process import Priority, ProgressCallback
from virt_reclaim.qemu_img import ImageInfo
from virt_reclaim.units import format_bytes

MIB = 1024 * 1024
# Recorded in the journal (not a step of its own) once the guest was asked to stop.
SHUTDOWN_REQUESTED = "shutdown-requested"


class Step(enum.StrEnum):
    """The steps of a job, in order."""

    INSPECT = "inspect"
    ESTIMATE = "estimate"
    PREFLIGHT = "preflight"
    FREE_SPACE = "free-space"
    SHUTDOWN = "shutdown"
    GUARD = "guard"
    REWRITE = "rewrite"
    VERIFY = "verify"
    SWAP = "swap"
    RESTORE = "restore"


class Outcome(enum.StrEnum):
    """How a job ended."""

    RECLAIMED = "reclaimed"
    NOTHING_TO_DO = "nothing-to-do"
    DRY_RUN = "dry-run"
    SKIPPED = "skipped"
    FAILED = "failed"
    ABANDONED = "abandoned"  # stopped (daemon shutting down); everything as it was


class Compression(enum.StrEnum):
    """The qcow2 compression of the rewritten image."""

    ZSTD = "zstd"
    ZLIB = "zlib"
    NONE = "none"


class After(enum.StrEnum):
    """The guest's power state after a job that succeeded (a failed one restores the previous)."""

    PREVIOUS = "previous"
    START = "start"
    OFF = "off"


class OnShutdownTimeout(enum.StrEnum):
    """What to do when the guest is not off within the shutdown timeout."""

    ABORT = "abort"  # leave it running, change nothing
    FORCE = "force"  # power it off


@dataclass(frozen=True)
class JobSettings:
    """How a job runs; the defaults are those of a policy that sets nothing."""

    free_space: FreeSpaceMethod = FreeSpaceMethod.AUTO
    free_space_timeout_s: float = 600.0
    reserve: Reserve = field(default_factory=Reserve)  # what a zero-fill leaves free
    compression: Compression = Compression.ZSTD
    cluster_size: int | None = None  # None keeps each image's own
    preallocation: str = "off"  # or "metadata"; never with compression
    shutdown_timeout_s: float = 120.0
    on_shutdown_timeout: OnShutdownTimeout = OnShutdownTimeout.ABORT
    min_gain: int = 64 * MIB
    min_gain_percent: float = 0.0
    after: After = After.PREVIOUS
    keep_backup: bool = False
    dry_run: bool = False
    agent_start_timeout_s: float = 120.0
    qemu_img: str = "qemu-img"
    priority: Priority | None = field(default_factory=Priority)


# Steps that run to their end even when the job is asked to stop: the swap is quick and
# bringing the guest back is the point of stopping safely.
_FINISH_ONCE_BEGUN = frozenset({Step.SWAP, Step.RESTORE})


class JobSkipped(Exception):
    """The domain or its disks are not eligible; nothing was changed."""


class NothingToDo(Exception):
    """The estimated gain is below the minimum; nothing was changed."""


class JobFailed(Exception):
    """The job could not finish; everything was restored."""


class JobAbandoned(Exception):
    """The job was asked to stop before the swap; everything was restored."""


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
    rewrite_need: int = 0  # qemu-img measure: what the rewrite may write at most
    zeroed_bytes: int = 0  # zeros our fill wrote into filesystems on this disk
    guest_used: int | None = None  # bytes the guest's filesystems on it use
    estimate: estimating.Estimate | None = None

    def summary(self) -> dict[str, Any]:
        """The disk's entry in the job's result."""
        return {
            "target": self.target,
            "path": self.path,
            "virtual_size": self.info.virtual_size,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "estimated_after": self.estimated_after,
            "estimate_basis": self.estimate.basis if self.estimate else None,
            "guest_used": self.guest_used,
            "backup": self.backup if self.swapped else None,
        }


@dataclass
class JobResult:
    """How the job ended, with figures; ``to_json`` is the documented output."""

    domain: str
    job_id: str
    outcome: Outcome
    reason: str
    downtime_s: float
    duration_s: float
    disks: list[dict[str, Any]]
    skipped_disks: list[dict[str, str]]
    free_space: str | None
    free_space_plan: str | None = None  # the method chosen, and why ("none (...)")

    def to_json(self) -> dict[str, Any]:
        """The JSON object printed by ``run --json``."""
        return {
            "domain": self.domain,
            "job_id": self.job_id,
            "outcome": str(self.outcome),
            "reason": self.reason,
            "downtime_s": round(self.downtime_s, 3),
            "duration_s": round(self.duration_s, 3),
            "disks": self.disks,
            "skipped_disks": self.skipped_disks,
            "free_space": self.free_space,
            "free_space_plan": self.free_space_plan,
        }


def new_job_id() -> str:
    """A short random id that names the job in logs and in its temporary files."""
    return uuid.uuid4().hex[:12]


class ReclaimJob:
    """Reclaim the qcow2 disks of one domain (see the module docstring for the steps)."""

    def __init__(
        self,
        domain: DomainPort,
        images: ImagePort,
        settings: JobSettings,
        *,
        images_of_other_domains: Callable[[], dict[str, str]],
        job_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_progress: Callable[[str, float], None] | None = None,
        journal: Journal | None = None,
        before_step: Callable[[Step], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """Prepare a job; nothing happens until ``run``.

        Args:
            domain: The domain to reclaim.
            images: qemu-img.
            settings: How to reclaim.
            images_of_other_domains: Returns {real path: domain name} of every image
                any other domain uses (sources and backing files).
            job_id: Names the job in logs and temporary files; random by default.
            clock: Monotonic seconds, for durations.
            on_progress: Called with (disk target, percent) during the rewrite.
            journal: Where each step is recorded before it is taken (for recovery).
            before_step: Called before each step, after the journal has it (tests pause here).
            stop: When set, the job stops at the next step before the swap (and a rewrite or
                verification under way is killed if ``images`` shares the event), restores
                the guest and ends ``abandoned``; from the swap on it finishes.
        """
        self.domain = domain
        self.images = images
        self.settings = settings
        self.job_id = job_id or new_job_id()
        self._others = images_of_other_domains
        self._clock = clock
        self._on_progress = on_progress
        self._journal = journal
        self._before_step = before_step
        self._stop = stop
        self._started_wall = time.time()
        self.log = structlog.get_logger("virt_reclaim.job").bind(
            domain=domain.name, job_id=self.job_id
        )
        if settings.dry_run:
            # Estimates (plan, the daemon's queue) must not look like jobs to log alerts.
            self.log = self.log.bind(dry_run=True)
        self.disks: list[DiskWork] = []
        self.skipped_disks: list[dict[str, str]] = []
        self.was_running = False
        self.agent_connected = False
        self.guard = ImageGuard()
        self._down_since: float | None = None
        self._downtime = 0.0
        self._free_space: str | None = None
        self.agent: AgentInfo | None = None
        self.choice: Choice | None = None
        self._guest_filesystems: list[GuestFilesystem] = []
        self.fill_plan: fillplan.FillPlan | None = None

    # -- the run -------------------------------------------------------------------------

    def run(self) -> JobResult:
        """Run every step; return the outcome. Never leaves the guest or images changed on failure.

        Raises only for interrupts (KeyboardInterrupt, SystemExit), after restoring.
        """
        # Bound in the context, not only on self.log, so that events of other modules
        # during the job (a libvirt reconnect, say) say which job and domain they belong to.
        with structlog.contextvars.bound_contextvars(domain=self.domain.name, job_id=self.job_id):
            return self._run()

    def _run(self) -> JobResult:
        started = self._clock()
        self.log.info(
            "job.started",
            free_space=str(self.settings.free_space),
            compression=str(self.settings.compression),
            on_shutdown_timeout=str(self.settings.on_shutdown_timeout),
            min_gain=self.settings.min_gain,
        )
        if self._journal is not None:
            self._journal.begin_job(
                self.job_id, self.domain.name, self.domain.uuid, self._settings_record()
            )
        try:
            outcome, reason = self._run_steps()
        except JobSkipped as exc:
            outcome, reason = Outcome.SKIPPED, str(exc)
        except NothingToDo as exc:
            outcome, reason = Outcome.NOTHING_TO_DO, str(exc)
        except JobAbandoned as exc:
            outcome, reason = Outcome.ABANDONED, str(exc)
        except (JobFailed, VirtError, QemuImgError, GuardError, JournalError, OSError) as exc:
            outcome, reason = Outcome.FAILED, str(exc)
        bytes_before = sum(d.bytes_before for d in self.disks)
        bytes_after = sum(d.bytes_after or 0 for d in self.disks if d.swapped) or None
        estimates = [d.estimated_after for d in self.disks]
        estimated_after = (
            sum(e for e in estimates if e is not None)
            if all(e is not None for e in estimates) and estimates
            else None
        )
        result = JobResult(
            domain=self.domain.name,
            job_id=self.job_id,
            outcome=outcome,
            reason=reason,
            downtime_s=self._downtime,
            duration_s=self._clock() - started,
            disks=[d.summary() for d in self.disks],
            skipped_disks=self.skipped_disks,
            free_space=self._free_space,
            free_space_plan=(
                f"{self.choice.method} ({self.choice.why})" if self.choice is not None else None
            ),
        )
        if self._journal is not None:
            self._journal.finish_job(
                self.job_id,
                outcome=str(outcome),
                reason=reason,
                bytes_before=bytes_before or None,
                bytes_after=bytes_after,
                downtime_s=round(result.downtime_s, 3),
                duration_s=round(result.duration_s, 3),
                estimated_after=estimated_after,
            )
        level = "error" if outcome is Outcome.FAILED and not self.settings.dry_run else "info"
        getattr(self.log, level)(
            "job.finished",
            outcome=str(outcome),
            reason=reason,
            bytes_before=bytes_before,
            bytes_after=bytes_after,
            estimated_after=estimated_after,
            downtime_s=round(result.downtime_s, 3),
            duration_s=round(result.duration_s, 3),
        )
        return result

    def _run_steps(self) -> tuple[Outcome, str]:
        with self._step(Step.INSPECT):
            self._inspect()
        with self._step(Step.ESTIMATE):
            self._estimate()
        with self._step(Step.PREFLIGHT):
            self._preflight()
        if self.settings.dry_run:
            return Outcome.DRY_RUN, "dry run: nothing was changed"
        if self.was_running:
            with self._step(Step.FREE_SPACE):
                self._free_guest_space()
        failure: BaseException | None = None
        try:
            with self._step(Step.SHUTDOWN):
                self._shut_down()
            with self._step(Step.GUARD):
                self._guard()
            with self._step(Step.PREFLIGHT):
                self._preflight()
            with self._step(Step.REWRITE):
                self._rewrite()
            with self._step(Step.VERIFY):
                self._verify()
            with self._step(Step.SWAP):
                self._swap()
        except BaseException as exc:
            failure = exc
            self._remove_temporary_files()
            raise
        finally:
            self.guard.release()
            try:
                with self._step(Step.RESTORE):
                    self._restore(succeeded=failure is None)
            except VirtError as restore_error:
                # Report both: why the job stopped, and that the guest is not back.
                if isinstance(failure, Exception):
                    raise JobFailed(
                        f"{failure}; then the guest could not be started again: {restore_error}"
                    ) from restore_error
                raise
        freed = sum(d.bytes_before - (d.bytes_after or 0) for d in self.disks)
        return Outcome.RECLAIMED, f"freed {format_bytes(freed)}"

    @contextmanager
    def _step(self, step: Step) -> Iterator[None]:
        if self._stop is not None and self._stop.is_set() and step not in _FINISH_ONCE_BEGUN:
            self.log.info("job.abandoned", step=str(step))
            raise JobAbandoned(f"stopped before step {step}: the service is stopping")
        if self._journal is not None:
            self._journal.enter_step(self.job_id, str(step))
        if self._before_step is not None:
            self._before_step(step)
        began = self._clock()
        self.log.info("step.started", step=str(step))
        try:
            yield
        except Cancelled as exc:
            self.log.info("job.abandoned", step=str(step))
            raise JobAbandoned(f"stopped during step {step}: the service is stopping") from exc
        except (JobSkipped, NothingToDo, JobAbandoned) as exc:
            self.log.info("step.finished", step=str(step), result=str(exc),
                          duration_s=round(self._clock() - began, 3))  # fmt: skip
            raise
        except BaseException as exc:
            self.log.warning("step.failed", step=str(step), error=str(exc) or type(exc).__name__,
                             duration_s=round(self._clock() - began, 3))  # fmt: skip
            raise
        self.log.info("step.finished", step=str(step), duration_s=round(self._clock() - began, 3))

    # -- the steps -----------------------------------------------------------------------

    def _inspect(self) -> None:
        snap = self.domain.snapshot()
        if not snap.persistent:
            raise JobSkipped("transient domain: it has no definition to restart it from")
        if snap.state not in (DomainState.RUNNING, DomainState.SHUTOFF):
            raise JobSkipped(f"domain is {snap.state}; only running or shut off domains qualify")
        self.was_running = snap.state is DomainState.RUNNING
        live = domxml.parse_domain(snap.xml)
        persistent = {d.target: d for d in domxml.parse_domain(self.domain.inactive_xml()).disks}
        self.agent_connected = self.was_running and live.agent_state == "connected"
        if self.agent_connected:
            try:
                self.agent = self.domain.agent_info()
            except AgentUnavailable as exc:
                self.log.info("agent.unavailable", reason=str(exc))
        others = self._others()
        for disk in live.disks:
            reason = self._ineligible(disk, persistent.get(disk.target), others)
            if reason is not None:
                self.skipped_disks.append(
                    {"target": disk.target, "path": disk.source or "", "reason": reason}
                )
                self.log.info("disk.skipped", target=disk.target, path=disk.source, reason=reason)
        if not self.disks:
            reasons = "; ".join(f"{s['target']}: {s['reason']}" for s in self.skipped_disks)
            raise JobSkipped(f"no eligible disk ({reasons or 'the domain has no disks'})")
        if self._journal is not None:
            self._journal.record_plan(
                self.job_id,
                str(snap.state),
                [JournalDisk(d.target, d.path, d.temp, d.backup) for d in self.disks],
            )

    def _ineligible(  # noqa: PLR0911 - one return per eligibility rule, in order
        self,
        disk: domxml.DiskSpec,
        persistent: domxml.DiskSpec | None,
        others: dict[str, str],
    ) -> str | None:
        """Return why ``disk`` cannot be reclaimed, or None after adding it to the work."""
        if disk.device != "disk":
            return f"a {disk.device}, not a disk"
        if not disk.is_file_qcow2 or disk.source is None:
            return f"not a file-backed qcow2 disk (type {disk.type}, format {disk.format})"
        if disk.readonly or disk.shareable:
            return "read-only or shared disk"
        if disk.encrypted:
            return "encrypted disk"
        if persistent is None or persistent.source != disk.source:
            return "the running and the persistent definition use different images"
        user = others.get(os.path.realpath(disk.source))
        if user is not None:
            return f"the image is also used by domain {user}"
        try:
            chain = self.images.info(disk.source, force_share=self.was_running)
        except QemuImgError as exc:
            return f"unreadable image: {exc}"
        top = chain[0]
        if top.format != "qcow2":
            return f"the image is {top.format}, not qcow2"
        if top.snapshot_count:
            return f"{top.snapshot_count} internal snapshot(s), which a rewrite would drop"
        if top.encrypted:
            return "encrypted image"
        if top.corrupt:
            return "the image is marked corrupt; run qemu-img check"
        backup = (
            imagefile.backup_path(disk.source, self._started_wall)
            if self.settings.keep_backup
            else None
        )
        self.disks.append(
            DiskWork(
                target=disk.target,
                path=disk.source,
                discard=disk.discard == "unmap",
                zeros_become_holes=disk.zeros_become_holes,
                info=top,
                temp=imagefile.temp_path(disk.source, self.job_id),
                backup=backup,
            )
        )
        return None

    def _estimate(self) -> None:
        self._read_guest_filesystems()
        used_by_target: dict[str, int] = {}
        for fs in self._guest_filesystems:
            for target in fs.disk_targets:
                used_by_target[target] = used_by_target.get(target, 0) + (fs.used_bytes or 0)
        all_discard = all(d.discard for d in self.disks)
        self.choice = choose_method(
            self.settings.free_space,
            all_disks_discard=all_discard,
            agent=self.agent if self.was_running else None,
        )
        for disk in self.disks:
            disk.bytes_before = imagefile.allocated_bytes(disk.path)
            disk.rewrite_need = self._rewrite_need(disk)
            disk.guest_used = used_by_target.get(disk.target)
        reach = 0.0
        if self.choice.method is FreeSpaceMethod.ZERO:
            self.fill_plan = self._plan_fill()
            reach = self.fill_plan.reach()
        share = freed_share(self.choice, all_disks_discard=all_discard, fill_reach=reach)
        for disk in self.disks:
            disk.estimate = self._estimate_disk(disk, share)
            disk.estimated_after = disk.estimate.after
            self.log.info("disk.estimated", target=disk.target, bytes_before=disk.bytes_before,
                          estimated_after=disk.estimated_after, basis=disk.estimate.basis,
                          guest_used=disk.guest_used,
                          stored_ratio=round(disk.estimate.stored_ratio, 3),
                          freed_share=round(share, 3), free_space=str(self.choice.method),
                          free_space_why=self.choice.why)  # fmt: skip
            if self._journal is not None:
                self._journal.record_disk(
                    self.job_id, disk.target, bytes_before=disk.bytes_before,
                    estimated_after=disk.estimated_after, guest_used=disk.guest_used,
                )  # fmt: skip
        gain = sum(d.bytes_before - (d.estimated_after or d.bytes_before) for d in self.disks)
        total = sum(d.bytes_before for d in self.disks)
        percent = 100.0 * gain / total if total else 0.0
        if gain < self.settings.min_gain:
            raise NothingToDo(
                f"estimated gain {format_bytes(max(0, gain))} is below the minimum of "
                f"{format_bytes(self.settings.min_gain)}"
            )
        if percent < self.settings.min_gain_percent:
            raise NothingToDo(
                f"estimated gain {percent:.1f} % is below the minimum of "
                f"{self.settings.min_gain_percent:g} %"
            )

    def _read_guest_filesystems(self) -> None:
        if not self.agent_connected:
            return
        targets = {d.target for d in self.disks}
        try:
            self._guest_filesystems = [
                fs for fs in self.domain.guest_filesystems() if targets & set(fs.disk_targets)
            ]
        except AgentUnavailable as exc:
            self.log.info("agent.unavailable", reason=str(exc))

    def _rewrite_need(self, disk: DiskWork) -> int:
        if disk.info.backing_filename:
            # Only the top layer is rewritten; it cannot outgrow what it holds now.
            return imagefile.allocated_bytes(disk.path) + MIB
        measured = self.images.measure(disk.path, force_share=self.was_running)
        if disk.zeroed_bytes and disk.rewrite_need:
            # measure counts the clusters our fill allocated, but convert writes no zero
            # clusters: they add nothing to what the rewrite needs.
            return max(disk.rewrite_need, measured - disk.zeroed_bytes)
        return measured

    def _estimate_disk(self, disk: DiskWork, share: float) -> estimating.Estimate:
        cluster = self.settings.cluster_size or disk.info.cluster_size or 65536
        extents = self.images.map(disk.path, force_share=self.was_running)
        offsets = estimating.sample_offsets(extents, disk.info.cluster_size or 65536)
        sample = estimating.sample_image(disk.path, offsets, disk.info.cluster_size or 65536)
        compressed = self.settings.compression is not Compression.NONE
        history = None
        if self._journal is not None and disk.guest_used:
            history = self._journal.compression_ratio(
                self.domain.uuid, disk.target, str(self.settings.compression)
            )
        return estimating.estimate_after(
            allocated=disk.bytes_before,
            virtual_size=disk.info.virtual_size,
            cluster=cluster,
            content=estimating.content_of(extents),
            sample=sample,
            compressed=compressed,
            guest_used=disk.guest_used,
            freed_share=share,
            history_ratio=history,
        )

    def _plan_fill(self) -> fillplan.FillPlan:
        rooms = [
            fillplan.DiskRoom(
                target=d.target,
                host=fillplan.host_filesystem(os.path.dirname(d.path)),
                headroom=max(0, d.info.virtual_size - imagefile.allocated_bytes(d.path)),
                zeros_become_holes=d.zeros_become_holes,
                rewrite_need=d.rewrite_need,
            )
            for d in self.disks
        ]
        volumes = [
            fillplan.GuestVolume(fs.mountpoint, fs.disk_targets, fs.total_bytes, fs.used_bytes)
            for fs in self._guest_filesystems
        ]
        return fillplan.plan_fill(rooms, volumes, self.settings.reserve)

    def _preflight(self) -> None:
        need_by_folder: dict[str, int] = {}
        for disk in self.disks:
            folder = os.path.dirname(disk.path)
            need_by_folder[folder] = need_by_folder.get(folder, 0) + self._rewrite_need(disk)
        for folder, image_bytes in need_by_folder.items():
            need = image_bytes + max(64 * MIB, image_bytes // 50)
            have = imagefile.free_bytes(folder)
            self.log.info("preflight.space", folder=folder, need=need, have=have)
            if have < need:
                raise JobSkipped(
                    f"not enough free space in {folder}: the rewrite needs up to "
                    f"{format_bytes(need)}, {format_bytes(have)} are free"
                )

    def _free_guest_space(self) -> None:
        choice = self.choice
        if choice is None or choice.method is FreeSpaceMethod.NONE:
            why = choice.why if choice is not None else "no guest agent connected"
            if self.agent is not None:
                self._free_space = "none"
            self.log.info("free_space.unavailable", reason=why)
            return
        mountpoints = [fs.mountpoint for fs in self._guest_filesystems]
        if choice.method is FreeSpaceMethod.TRIM:
            result = trim(self.domain, mountpoints, timeout=self.settings.free_space_timeout_s)
        else:
            # Planned again now: the host's free space may have changed since the estimate.
            self.fill_plan = self._plan_fill()
            result = self._zero_fill(self.fill_plan)
        self._free_space = result.method
        self._count_zeroed(result)
        if result.problem:
            self.log.warning("free_space.unavailable", method=str(choice.method),
                             reason=result.problem)  # fmt: skip
        self.log.info("free_space.done", method=result.method, filesystems=result.filesystems,
                      trimmed_bytes=result.trimmed_bytes, zeroed_bytes=result.zeroed_bytes,
                      fills=result.fills)  # fmt: skip
        if result.method != "none":
            self._recheck_gain(1.0 if result.method == "trim" else self.fill_plan_reach())
        # The fill may have grown the image, or another guest taken the room: find out
        # before the guest goes down, not after.
        self._preflight()

    def _count_zeroed(self, result: FreeSpaceResult) -> None:
        target_of = {
            fs.mountpoint: next((t for t in fs.disk_targets), None)
            for fs in self._guest_filesystems
        }
        by_target = {d.target: d for d in self.disks}
        for fill in result.fills:
            disk = by_target.get(str(target_of.get(str(fill["mountpoint"]))))
            if disk is not None:
                disk.zeroed_bytes += int(str(fill.get("zeroed_bytes") or 0))

    def fill_plan_reach(self) -> float:
        """Share of the guest's free space the last zero-fill plan reached."""
        return self.fill_plan.reach() if self.fill_plan is not None else 0.0

    def _recheck_gain(self, share: float) -> None:
        """Estimate again now that the guest's space is free, before any downtime."""
        self._read_guest_filesystems()
        used = {d.target: 0 for d in self.disks}
        for fs in self._guest_filesystems:
            for target in set(fs.disk_targets) & set(used):
                used[target] += fs.used_bytes or 0
        gain = 0
        for disk in self.disks:
            disk.guest_used = used[disk.target] or disk.guest_used
            again = self._estimate_disk(disk, share)
            now = imagefile.allocated_bytes(disk.path)
            gain += now - min(again.after, now)
            self.log.info("disk.reestimated", target=disk.target, estimated_after=again.after,
                          basis=again.basis)  # fmt: skip
        if gain < self.settings.min_gain:
            raise NothingToDo(
                f"after freeing the guest's space, the estimated gain {format_bytes(max(0, gain))}"
                f" is below the minimum of {format_bytes(self.settings.min_gain)}"
            )

    def _zero_fill(self, plan: fillplan.FillPlan) -> FreeSpaceResult:
        """Run the fill under a watch of the host's filesystems and of the guest's state."""
        watch = FillWatch(plan, self.domain, self._stop)
        with watch:
            try:
                return zero_fill(
                    self.domain, plan.fills, timeout=self.settings.free_space_timeout_s,
                    cancel=watch.stop,
                )  # fmt: skip
            except GuestExecCancelled:
                if watch.paused:
                    self.log.error("free_space.guest_paused", reason=watch.why)
                    raise JobFailed(
                        f"the guest was paused during the zero-fill: {watch.why}. Free space "
                        f"on that filesystem, then resume it (virsh resume {self.domain.name}); "
                        "the fill in the guest stops at its size limit and removes its file"
                    ) from None
                if watch.why is None:
                    raise  # the job is stopping
                self.log.warning("free_space.stopped", reason=watch.why)
                return FreeSpaceResult("none", (), f"zero-fill stopped: {watch.why}")

    def _shut_down(self) -> None:
        if not self.was_running:
            return
        use_agent = self.agent_connected and self.domain.agent_ping()
        self._down_since = self._clock()
        timeout = self.settings.shutdown_timeout_s
        if self._journal is not None:
            # Recovery waits for a shutdown under way only when one was really asked for.
            self._journal.enter_step(self.job_id, SHUTDOWN_REQUESTED)
        self._request_shutdown(use_agent, timeout)
        if self.domain.wait_for_state(DomainState.SHUTOFF, timeout):
            return
        if self.settings.on_shutdown_timeout is OnShutdownTimeout.ABORT:
            self.log.warning("shutdown.timeout", timeout_s=timeout, action="abort")
            raise JobFailed(
                f"the guest did not shut down within {timeout:g} s; left running, "
                "nothing changed (on-shutdown-timeout=abort)"
            )
        self.log.warning("shutdown.timeout", timeout_s=timeout, action="force")
        self.domain.force_off()
        if not self.domain.wait_for_state(DomainState.SHUTOFF, 60):
            raise JobFailed("the guest is still not off after a forced power-off")

    def _request_shutdown(self, use_agent: bool, timeout: float) -> None:
        """Ask for the shutdown without letting the request itself eat the deadline.

        qemu-ga never answers a guest-shutdown that works (the guest goes away);
        when the guest ignores it, libvirt waits 60 s for that answer. So the
        request runs on a thread and only the domain's state decides.
        """
        failures: list[VirtError] = []

        def request() -> None:
            try:
                self.domain.shutdown(use_agent=use_agent)
            except VirtError as exc:
                failures.append(exc)

        # A copy of the context so that the thread's log events keep the job's identity.
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run, args=(request,), name="shutdown-request", daemon=True
        )
        thread.start()
        thread.join(min(5.0, timeout))
        if not failures:
            return
        if not use_agent:
            raise failures[0]
        self.log.info("shutdown.agent_failed", reason=str(failures[0]))
        self.domain.shutdown(use_agent=False)

    def _guard(self) -> None:
        for disk in self.disks:
            self.guard.lock(disk.path)
        # A start could have come between the stop and the lock: now it can no longer.
        state = self.domain.state()
        if state is not DomainState.SHUTOFF:
            raise JobFailed(f"the domain was started during the job (it is {state})")
        current = {
            d.target: d.source for d in domxml.parse_domain(self.domain.inactive_xml()).disks
        }
        for disk in self.disks:
            if current.get(disk.target) != disk.path:
                raise JobFailed(
                    f"{disk.target}: the definition changed during the job "
                    f"({disk.path} -> {current.get(disk.target)})"
                )

    def _rewrite(self) -> None:
        compression = (
            None
            if self.settings.compression is Compression.NONE
            else str(self.settings.compression)
        )
        for disk in self.disks:
            imagefile.remove_quietly(disk.temp)
            progress = self._progress_callback(disk.target)
            self.images.convert(
                disk.path,
                disk.temp,
                compression=compression,
                cluster_size=self.settings.cluster_size or disk.info.cluster_size,
                backing=disk.info.backing_recorded,
                backing_format=disk.info.backing_format,
                size_bytes=disk.info.virtual_size,
                on_progress=progress,
                preallocation=self.settings.preallocation,
            )
            # Locks belong to the inode: the new image carries the guard across the rename.
            self.guard.lock(disk.temp)
            # qemu-img convert does not flush; and st_blocks is only final after writeback.
            imagefile.fsync_file(disk.temp)
            disk.bytes_after = imagefile.allocated_bytes(disk.temp)
            if self._journal is not None:
                self._journal.record_disk(self.job_id, disk.target, bytes_after=disk.bytes_after)
            self.log.info("rewrite.done", target=disk.target, bytes_before=disk.bytes_before,
                          bytes_after=disk.bytes_after)  # fmt: skip

    def _verify(self) -> None:
        for disk in self.disks:
            self.images.check(disk.temp, size_bytes=disk.info.virtual_size)
            self.images.compare(disk.path, disk.temp, size_bytes=disk.info.virtual_size)

    def _swap(self) -> None:
        for disk in self.disks:
            imagefile.copy_metadata(disk.path, disk.temp)
            imagefile.swap_in(disk.temp, disk.path, backup=disk.backup)
            disk.swapped = True
            self.log.info("swap.done", target=disk.target, path=disk.path, backup=disk.backup)

    def _restore(self, *, succeeded: bool) -> None:
        after = self.settings.after if succeeded else After.PREVIOUS
        want_running = self.was_running if after is After.PREVIOUS else after is After.START
        if not want_running:
            if self._down_since is not None:
                self._downtime = self._clock() - self._down_since
            return
        if self.domain.state() is DomainState.RUNNING:
            # Never stopped (an aborted shutdown): nothing to bring back. Its agent may be
            # tied up by libvirt for a minute by the ignored shutdown; do not wait on it.
            return
        self.domain.start()
        if self._down_since is not None:
            self._downtime = self._clock() - self._down_since
        if self.agent_connected and not self.domain.wait_for_agent(
            self.settings.agent_start_timeout_s
        ):
            self.log.warning("restore.agent_missing", timeout_s=self.settings.agent_start_timeout_s)

    def _settings_record(self) -> dict[str, Any]:
        return {
            "free_space": str(self.settings.free_space),
            "host_reserve": self.settings.reserve.host_min_bytes,
            "host_reserve_percent": self.settings.reserve.host_percent,
            "guest_reserve_percent": self.settings.reserve.guest_percent,
            "compression": str(self.settings.compression),
            "cluster_size": self.settings.cluster_size,
            "shutdown_timeout_s": self.settings.shutdown_timeout_s,
            "on_shutdown_timeout": str(self.settings.on_shutdown_timeout),
            "min_gain": self.settings.min_gain,
            "min_gain_percent": self.settings.min_gain_percent,
            "after": str(self.settings.after),
            "keep_backup": self.settings.keep_backup,
            "dry_run": self.settings.dry_run,
        }

    def _remove_temporary_files(self) -> None:
        for disk in self.disks:
            if not disk.swapped and imagefile.remove_quietly(disk.temp):
                self.log.info("cleanup.removed", path=disk.temp)

    def _progress_callback(self, target: str) -> ProgressCallback | None:
        report = self._on_progress
        if report is None:
            return None

        def parse(chunk: str) -> None:
            # qemu-img -p prints "    (12.34/100%)\r"
            for piece in chunk.split("\r"):
                head = piece.strip().lstrip("(").split("/", 1)[0]
                try:
                    report(target, float(head))
                except ValueError:
                    continue

        return parse
