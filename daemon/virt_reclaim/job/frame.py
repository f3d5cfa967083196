"""The frame of a reclaim job: the steps every mode shares, the mode's own, and the restore.

INSPECT -> ESTIMATE -> PREFLIGHT (``steps``, one module each; a dry run ends here) ->
FREE_SPACE (``freespace.step``, while the guest runs) -> the policy's before_shutdown
hook (``hooks``; a mode that stops a running guest) -> the mode's steps
(``modes.offline``: SHUTDOWN -> GUARD -> PREFLIGHT -> REWRITE -> VERIFY -> SWAP) ->
RESTORE, then the mode's steps after it, if it has any (``modes.convert``: CLEANUP).
A job that went past PREFLIGHT runs the after_job hook once it has ended, whatever
its outcome.
Every step is journaled before it is taken and logged when it starts and ends
(``context``). Whatever the mode does, the frame brings the guest back to
the power state it had (or the one the policy asks for after a success), and
reports both when the job and the restore fail.

``run_job`` is how ``virt-reclaim run`` and the daemon both run one: under the
domain's lock (one job per domain at a time, across processes), refused while the
journal still has an unfinished job of the domain.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import structlog

from virt_reclaim.errors import QemuImgError, VirtError
from virt_reclaim.image.guard import GuardError
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job import hooks, modes
from virt_reclaim.job.context import JobContext, Step
from virt_reclaim.job.freespace import step
from virt_reclaim.job.lock import DomainLock
from virt_reclaim.job.modes import JobMode
from virt_reclaim.job.ports import DomainPort, ImagePort
from virt_reclaim.job.results import (
    FreedInPlace,
    JobAbandoned,
    JobFailed,
    JobResult,
    JobSkipped,
    JobUnfinished,
    NothingToDo,
    Outcome,
    SpaceTaken,
)
from virt_reclaim.job.settings import After, JobSettings
from virt_reclaim.job.steps import estimate, inspect, preflight
from virt_reclaim.journal.records import JournalError
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import DomainState
from virt_reclaim.process import Priority
from virt_reclaim.reports import inventory
from virt_reclaim.units import format_bytes
from virt_reclaim.virt.connection import Hypervisor
from virt_reclaim.virt.domain import Domain


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
        mode: JobMode | None = None,
        history: Callable[[str, str, str], float | None] | None = None,
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
            mode: The mode asked for; the one ``settings.mode`` names by default
                (``modes.decide`` settles the one the job takes, after inspect).
            history: What this domain's past reclaims reached (``Journal.compression_ratio``),
                for a dry run that has no journal of its own.
        """
        self.mode = mode or modes.mode_of(settings.mode)
        self.job = JobContext(
            domain=domain,
            images=images,
            settings=settings,
            job_id=job_id or new_job_id(),
            images_of_other_domains=images_of_other_domains,
            clock=clock,
            journal=journal,
            before_step=before_step,
            stop=stop,
            on_progress=on_progress,
            history=history,
        )
        self.job_id = self.job.job_id
        self.log = self.job.log
        # Past the read-only steps: the after_job hook runs when the job ends.
        self._changing = False

    def run(self) -> JobResult:
        """Run every step; return the outcome. Never leaves the guest or images changed on failure.

        Raises only for interrupts (KeyboardInterrupt, SystemExit), after restoring.
        """
        # Bound in the context, not only on the logger, so that events of other modules
        # during the job (a libvirt reconnect, say) say which job and domain they belong to.
        job = self.job
        with structlog.contextvars.bound_contextvars(domain=job.domain.name, job_id=job.job_id):
            return self._run()

    def _run(self) -> JobResult:
        job = self.job
        started = job.clock()
        settings = job.settings
        job.log.info("job.started", mode=str(self.mode.name), free_space=str(settings.free_space),
                     compression=str(settings.compression),
                     on_shutdown_timeout=str(settings.on_shutdown_timeout),
                     min_gain=settings.min_gain)  # fmt: skip
        if job.journal is not None:
            job.journal.begin_job(job.job_id, job.domain.name, job.domain.uuid,
                                  settings, mode=str(self.mode.name))  # fmt: skip
        waits_for_space = False
        try:
            outcome, reason = self._run_steps()
        except SpaceTaken as exc:
            outcome, reason, waits_for_space = Outcome.SKIPPED, str(exc), True
        except JobSkipped as exc:
            outcome, reason = Outcome.SKIPPED, str(exc)
        except FreedInPlace as exc:
            outcome, reason = Outcome.RECLAIMED, str(exc)
        except NothingToDo as exc:
            outcome, reason = Outcome.NOTHING_TO_DO, str(exc)
        except JobAbandoned as exc:
            outcome, reason = Outcome.ABANDONED, str(exc)
        except JobUnfinished as exc:
            outcome, reason = Outcome.FAILED, str(exc)
            return self._ended(self._finish(outcome, reason, job.clock() - started,
                                            journal=False))  # fmt: skip
        except (JobFailed, VirtError, QemuImgError, GuardError, JournalError, OSError) as exc:
            outcome, reason = Outcome.FAILED, str(exc)
        result = self._finish(outcome, reason, job.clock() - started)
        result.waits_for_space = waits_for_space
        return self._ended(result)

    def _ended(self, result: JobResult) -> JobResult:
        """Run the after_job hook of a job that went past its read-only steps."""
        if self._changing:
            before, after, reclaimed = _figures(self.job)
            hooks.after_job(self.job, str(self.mode.name), hooks.Ending(
                outcome=result.outcome, reason=result.reason, bytes_before=before,
                bytes_after=after, reclaimed=reclaimed, downtime_s=result.downtime_s,
            ))  # fmt: skip
        return result

    def _run_steps(self) -> tuple[Outcome, str]:
        job = self.job
        with job.step(Step.INSPECT):
            inspect.inspect(job, live=not self.mode.stops_the_guest)
        self.mode = modes.decide(job, self.mode)
        with job.step(Step.ESTIMATE):
            estimate.estimate(job)
        with job.step(Step.PREFLIGHT):
            preflight.preflight(job)
        if job.settings.dry_run:
            return Outcome.DRY_RUN, "dry run: nothing was changed"
        self._changing = True
        if job.was_running:
            with job.step(Step.FREE_SPACE):
                step.free_guest_space(job)
            if self.mode.stops_the_guest:
                # The last moment before downtime: nothing changed yet if it says no.
                hooks.before_shutdown(job, str(self.mode.name))
        failure: BaseException | None = None
        try:
            self.mode.run(job)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            try:
                with job.step(Step.RESTORE):
                    self._restore(succeeded=failure is None)
            except VirtError as restore_error:
                # Report both: why the job stopped, and that the guest is not back.
                if isinstance(failure, Exception):
                    raise JobFailed(
                        f"{failure}; then the guest could not be started again: {restore_error}"
                    ) from restore_error
                raise
        self.mode.after_restore(job)
        freed = sum(d.bytes_before - (d.bytes_after or 0) for d in job.disks)
        return Outcome.RECLAIMED, f"freed {format_bytes(freed)}"

    def _restore(self, *, succeeded: bool) -> None:
        """Bring the guest to the power state it had, or to the policy's after a success."""
        job = self.job
        after = job.settings.after if succeeded else After.PREVIOUS
        want_running = job.was_running if after is After.PREVIOUS else after is After.START
        if not want_running:
            if job.down_since is not None:
                job.downtime = job.clock() - job.down_since
            return
        if job.domain.state() is DomainState.RUNNING:
            # Never stopped (an aborted shutdown, or a live mode): nothing to bring back. Its
            # agent may be tied up by libvirt for a minute by an ignored shutdown; no waiting.
            return
        job.domain.start()
        if job.down_since is not None:
            job.downtime = job.clock() - job.down_since
        timeout = job.settings.agent_start_timeout_s
        if job.agent_connected and not job.domain.wait_for_agent(timeout):
            job.log.warning("restore.agent_missing", timeout_s=timeout)

    def _finish(
        self, outcome: Outcome, reason: str, duration: float, *, journal: bool = True
    ) -> JobResult:
        """Journal (unless ``journal`` is False: recovery's to finish) and log how it ended."""
        job = self.job
        bytes_before, bytes_after, _reclaimed = _figures(job)
        estimates = [d.estimated_after for d in job.disks]
        estimated_after = (
            sum(e for e in estimates if e is not None)
            if estimates and all(e is not None for e in estimates)
            else None
        )
        choice = job.choice
        result = JobResult(
            domain=job.domain.name,
            job_id=job.job_id,
            outcome=outcome,
            reason=reason,
            downtime_s=job.downtime,
            duration_s=duration,
            disks=[d.result() for d in job.disks],
            skipped_disks=job.skipped_disks,
            free_space=job.free_space,
            free_space_plan=f"{choice.method} ({choice.why})" if choice is not None else None,
            mode=self.mode.name,
        )
        if job.journal is not None and journal:
            job.journal.finish_job(
                job.job_id, outcome=outcome, reason=reason,
                bytes_before=bytes_before or None, bytes_after=bytes_after,
                downtime_s=round(result.downtime_s, 3), duration_s=round(duration, 3),
                estimated_after=estimated_after,
            )  # fmt: skip
        level = "error" if outcome is Outcome.FAILED and not job.settings.dry_run else "info"
        getattr(job.log, level)(
            "job.finished", outcome=str(outcome), reason=reason, bytes_before=bytes_before,
            bytes_after=bytes_after, estimated_after=estimated_after,
            downtime_s=round(result.downtime_s, 3), duration_s=round(duration, 3),
        )  # fmt: skip
        return result


def _figures(job: JobContext) -> tuple[int, int | None, int]:
    """Bytes of the job's disks before; after, of those it rewrote (None: none); freed."""
    done = [d for d in job.disks if d.swapped or d.freed_in_place]
    bytes_after = sum(d.bytes_after or 0 for d in done) or None
    reclaimed = sum(d.bytes_before - d.bytes_after for d in done if d.bytes_after is not None)
    return sum(d.bytes_before for d in job.disks), bytes_after, reclaimed


def run_job(
    hypervisor: Hypervisor,
    domain: Domain,
    settings: JobSettings,
    *,
    journal: Journal,
    state_dir: str,
    priority: Priority,
    on_progress: Callable[[str, float], None] | None = None,
    before_step: Callable[[Step], None] | None = None,
    stop: threading.Event | None = None,
) -> JobResult:
    """Reclaim ``domain`` under its lock and return the outcome.

    Raises:
        DomainBusy: Another job holds the domain.
        JournalError: The journal has an unfinished job of the domain, or cannot be used.
    """
    with DomainLock(state_dir, domain.uuid):
        unfinished = journal.unfinished(domain.uuid)
        if unfinished:
            raise JournalError(
                f"{domain.name} has an unfinished job ({unfinished[0].id}) that recovery could "
                "not close; see the log of 'virt-reclaim recover'"
            )

        def images_of_other_domains() -> dict[str, str]:
            return inventory.images_in_use(hypervisor.domains(), exclude_uuid=domain.uuid)

        job = ReclaimJob(
            domain,
            QemuImg(settings.qemu_img, priority, cancel=stop),
            settings,
            images_of_other_domains=images_of_other_domains,
            on_progress=on_progress,
            journal=journal,
            before_step=before_step,
            stop=stop,
        )
        return job.run()
