"""The daemon's worker threads, each on its own libvirt connection.

- an estimator thread per firing (``estimate_candidates``): the dry runs of the domains a
  window chose (qemu-img measure can take seconds), made into queue candidates;
- a thread per job (``run_candidate``): one reclaim job, under its domain lock.

``Workers`` starts them and keeps track of the jobs; each thread reports its
result by posting a message to the main loop (``messages.Estimated``,
``messages.JobDone``), always, even when it failed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from virt_reclaim.config import loading
from virt_reclaim.config.policy import Policy, job_settings
from virt_reclaim.errors import AgentUnavailable, VirtError
from virt_reclaim.job.frame import run_job
from virt_reclaim.job.lock import DomainBusy
from virt_reclaim.job.results import JobResult, Outcome
from virt_reclaim.journal.records import JournalError
from virt_reclaim.journal.store import Journal
from virt_reclaim.metrics import observations
from virt_reclaim.model import DomainObservation, DomainState
from virt_reclaim.process import Priority
from virt_reclaim.reports import plan
from virt_reclaim.service import scheduler
from virt_reclaim.service.messages import Estimated, JobDone, JobEnd, Post
from virt_reclaim.service.scheduler import Candidate
from virt_reclaim.virt.connection import Hypervisor

log = structlog.get_logger("virt_reclaim.workers")


@dataclass
class RunningJob:
    """A job thread and what the main loop knows of it."""

    domain: str
    policy: str
    thread: threading.Thread
    started: float
    candidate: Candidate
    # (disk, percent) of the rewrite, set by the job's thread; read by the status snapshot.
    progress: tuple[str, float] | None = None


class Workers:
    """Starts the worker threads; the jobs running, by domain uuid; the event that stops them."""

    def __init__(self, post: Post, observer: observations.Observations | None = None) -> None:
        self._post = post
        self.observer = observer  # told of the dry runs' estimates and skips (the metrics)
        self.running: dict[str, RunningJob] = {}
        self.stop = threading.Event()

    def start_estimates(
        self,
        daemon_config: loading.DaemonConfig,
        policy: Policy,
        chosen: list[DomainObservation],
        rate: float,
    ) -> None:
        """Start the dry runs of ``chosen`` on a thread; it posts ``Estimated``."""
        threading.Thread(
            target=self._run_estimates, args=(daemon_config, policy, chosen, rate),
            name=f"estimate-{policy.name}", daemon=True,
        ).start()  # fmt: skip

    def _run_estimates(
        self,
        daemon_config: loading.DaemonConfig,
        policy: Policy,
        chosen: list[DomainObservation],
        rate: float,
    ) -> None:
        candidates: list[Candidate] = []
        try:
            candidates = estimate_candidates(
                daemon_config.uri, daemon_config.qemu_img, policy, chosen, rate,
                observer=self.observer, state_dir=daemon_config.state_dir,
            )  # fmt: skip
        except Exception:  # a bug must not leave the window waiting for this estimate forever
            log.exception("window.estimate_failed", policy=policy.name)
        finally:
            self._post(Estimated(policy.name, candidates))

    def start_job(
        self, candidate: Candidate, policy: Policy, daemon_config: loading.DaemonConfig, now: float
    ) -> None:
        """Start the candidate's job on a thread; it posts ``JobDone``."""
        thread = threading.Thread(
            target=self._job, args=(candidate, policy, daemon_config), name=f"job-{candidate.name}"
        )
        self.running[candidate.uuid] = RunningJob(
            candidate.name, policy.name, thread, now, candidate
        )
        thread.start()

    def _job(
        self, candidate: Candidate, policy: Policy, daemon_config: loading.DaemonConfig
    ) -> None:
        job = self.running[candidate.uuid]

        def progress(disk: str, percent: float) -> None:
            job.progress = (disk, percent)  # one reference replaced: the reader sees old or new

        ended = JobEnd(None, waits_for_space=False)
        try:
            ended = run_candidate(candidate, policy, daemon_config, self.stop, progress)
        finally:
            self._post(JobDone(candidate.uuid, ended))

    def job_done(self, uuid: str) -> RunningJob | None:
        """The job of ``uuid`` posted its end: forget it and join its thread."""
        job = self.running.pop(uuid, None)
        if job is not None:
            job.thread.join()
        return job


def estimate_candidates(
    uri: str,
    qemu_img: str,
    policy: Policy,
    chosen: Sequence[DomainObservation],
    rate: float,
    *,
    observer: observations.Observations | None = None,
    state_dir: str | None = None,
) -> list[Candidate]:
    """A dry run of each chosen domain; the candidates of those that would be reclaimed.

    ``rate`` is this host's rewrite rate (bytes per second) for the job's duration. With
    ``state_dir`` the estimates learn from each domain's past reclaims in the journal, as
    the job itself will.
    """
    found = estimate_each(uri, qemu_img, policy, chosen, rate,
                          observer=observer, state_dir=state_dir)  # fmt: skip
    return [e.candidate for e in found if e.candidate is not None]


@dataclass(frozen=True)
class ChosenDryRun:
    """One chosen domain's dry run: its candidate, or why it has none.

    ``result`` is the dry run's (None when it could not run); ``reason`` says why the
    domain is no candidate (None when it is one).
    """

    name: str
    candidate: Candidate | None
    result: JobResult | None
    reason: str | None


def estimate_each(
    uri: str,
    qemu_img: str,
    policy: Policy,
    chosen: Sequence[DomainObservation],
    rate: float,
    *,
    observer: observations.Observations | None = None,
    state_dir: str | None = None,
) -> list[ChosenDryRun]:
    """``estimate_candidates``, with what became of each chosen domain (``run --policy`` says)."""
    history = _history(state_dir)
    structlog.contextvars.bind_contextvars(policy=policy.name)
    found: list[ChosenDryRun] = []
    try:
        with Hypervisor(uri) as hypervisor:
            everyone = hypervisor.domains()
            for observed in chosen:
                found.append(_estimate_one(
                    hypervisor, everyone, policy, observed, qemu_img=qemu_img, rate=rate,
                    observer=observer, history=history,
                ))  # fmt: skip
    except VirtError as exc:
        log.warning("window.estimate_failed", error=str(exc))
    return found


def _history(state_dir: str | None) -> Callable[[str, str, str], float | None] | None:
    """The journal's record of past reclaims, or None when it cannot be read (no learning)."""
    if state_dir is None:
        return None
    try:
        return Journal(state_dir).compression_ratio
    except JournalError:
        return None


def _estimate_one(
    hypervisor: Hypervisor,
    everyone: list[DomainObservation],
    policy: Policy,
    observed: DomainObservation,
    *,
    qemu_img: str,
    rate: float,
    observer: observations.Observations | None = None,
    history: Callable[[str, str, str], float | None] | None = None,
) -> ChosenDryRun:
    try:
        domain = hypervisor.domain_by_uuid(observed.uuid)
        if policy.idle.no_logged_in_users and observed.state is DomainState.RUNNING:
            users = domain.logged_in_users()
            if users:
                reason = f"busy: users logged in ({', '.join(users[:5])})"
                log.info("domain.skipped", domain=observed.name, reason=reason)
                if observer is not None:
                    observer.skipped(observed.name, "busy: users logged in")
                return ChosenDryRun(observed.name, None, None, reason)
        result = plan.dry_run_policy(domain, policy, everyone, qemu_img=qemu_img, history=history)
    except AgentUnavailable as exc:
        reason = f"busy: cannot tell whether users are logged in ({exc})"
        log.info("domain.skipped", domain=observed.name, reason=reason)
        if observer is not None:
            observer.skipped(observed.name, "busy: users unknown")
        return ChosenDryRun(observed.name, None, None, reason)
    except VirtError as exc:
        log.info("domain.skipped", domain=observed.name, reason=str(exc))
        if observer is not None:
            observer.skipped(observed.name, str(exc), "error")
        return ChosenDryRun(observed.name, None, None, str(exc))
    if observer is not None:
        observer.estimated(observed.name, result)  # its disks' estimates; a skip unless DRY_RUN
    if result.outcome is not Outcome.DRY_RUN:
        log.info("domain.skipped", domain=observed.name, reason=result.reason,
                 outcome=str(result.outcome))  # fmt: skip
        return ChosenDryRun(observed.name, None, result, result.reason)
    disks = [(d.bytes_before, d.estimated_after) for d in result.disks]
    return ChosenDryRun(
        observed.name,
        scheduler.candidate(observed.name, observed.uuid, policy, disks, rate),
        result,
        None,
    )


def run_candidate(
    candidate: Candidate,
    policy: Policy,
    daemon_config: loading.DaemonConfig,
    stop: threading.Event,
    on_progress: Callable[[str, float], None] | None = None,
) -> JobEnd:
    """Run the candidate's job; how it ended. ``on_progress(disk, percent)`` as in run_job."""
    structlog.contextvars.bind_contextvars(policy=policy.name, domain=candidate.name)
    outcome: Outcome | None = None
    waits_for_space = False
    try:
        with Hypervisor(daemon_config.uri) as hypervisor:
            domain = hypervisor.domain_by_uuid(candidate.uuid)
            result = run_job(
                hypervisor,
                domain,
                job_settings(policy, qemu_img=daemon_config.qemu_img),
                journal=Journal(daemon_config.state_dir),
                state_dir=daemon_config.state_dir,
                priority=Priority(
                    daemon_config.nice, daemon_config.ionice_class, daemon_config.ionice_level
                ),
                stop=stop,
                on_progress=on_progress,
            )
            outcome = result.outcome
            waits_for_space = result.waits_for_space
    except (VirtError, JournalError, DomainBusy) as exc:
        log.error("job.not_run", error=str(exc))
    except Exception:  # a bug in one job must not take the daemon down
        log.exception("job.crashed")
    return JobEnd(outcome, waits_for_space)
