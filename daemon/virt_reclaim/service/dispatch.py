"""The daemon's side of its windows: feed ``windows.Windows`` and carry out what it decides.

The decisions are pure (``windows``, ``eligibility``); here they are logged, counted in the
metrics and done: the eligible domains of a window estimated on a thread
(``workers.estimate_candidates``), the estimated ones queued, the due jobs started
(``workers.start_job``). Each function is called by the daemon's main loop, with the daemon,
and only from that thread.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING

import structlog

from virt_reclaim.config.policy import Policy
from virt_reclaim.journal.records import JournalError
from virt_reclaim.journal.store import Journal
from virt_reclaim.service import scheduler, windows
from virt_reclaim.service.scheduler import Candidate
from virt_reclaim.units import format_bytes

if TYPE_CHECKING:
    from virt_reclaim.service.daemon import Daemon

log = structlog.get_logger("virt_reclaim.service")


def open_window(daemon: Daemon, policy: Policy, late: scheduler.LateWindow | None = None) -> None:
    """The policy fired (or its window was found open late): open it and look at its domains."""
    now = daemon.clock()
    window = daemon.windows.open_window(policy, now, late.ends_at if late else None)
    extra = {"late_s": round(late.late_s)} if late else {}
    log.info("window.opened", policy=policy.name, window_s=round(window.left(now)), **extra)
    daemon.metrics.observations.window_opened(policy.name)
    daemon.write_metrics()
    if daemon.host.hypervisor is None:
        log.warning("window.waiting", policy=policy.name, reason="libvirtd is unreachable")
        return
    select_candidates(daemon, policy)


def find_late_windows(daemon: Daemon) -> None:
    """Windows open now that the daemon was not running (or not configured) to open."""
    now = daemon.clock()
    for late in daemon.windows.find_late(daemon.policies, now, dt.datetime.now(dt.UTC)):
        log.info("window.found_open", policy=late.policy, late_s=round(late.late_s),
                 opens_in_s=round(late.opens_at - now, 1))  # fmt: skip


def select_candidates(daemon: Daemon, policy: Policy, only: set[str] | None = None) -> None:
    """Estimate the policy's eligible idle domains (or those of ``only``) on a thread."""
    if not daemon.windows.may_select(policy.name):
        return
    try:
        journal = Journal(daemon.daemon_config.state_dir)
        rate = scheduler.typical_rewrite_rate(journal.rewrite_rates())
    except JournalError as exc:
        log.error("window.journal_unusable", policy=policy.name, error=str(exc))
        return
    chosen = daemon.windows.select(
        policy, daemon.policies, daemon.host.domains, running=daemon.running,
        last_reclaimed_at=journal.last_reclaimed_at, wall=time.time(), only=only,
    )  # fmt: skip
    for skip in chosen.skipped:
        log.info("domain.skipped", domain=skip.name, policy=policy.name, reason=skip.reason)
        daemon.metrics.observations.skipped(skip.name, skip.reason)
    if chosen.nothing_to_do:
        log.info("window.nothing_to_do", policy=policy.name)
    if chosen.chosen:
        daemon.workers.start_estimates(daemon.daemon_config, policy, chosen.chosen, rate)


def queue_estimated(daemon: Daemon, policy_name: str, candidates: list[Candidate]) -> None:
    """The dry runs of a policy's domains are back: queue those new to its window."""
    for candidate in daemon.windows.estimated(policy_name, candidates):
        log.info("job.queued", domain=candidate.name, policy=policy_name,
                 estimated_gain=candidate.estimated_gain,
                 estimated_s=round(candidate.estimated_s))  # fmt: skip
    daemon.write_metrics()  # the dry runs' estimates


def watch_busy(daemon: Daemon, now: float) -> None:
    """After each sample: queue the watched domains of open windows that went idle."""
    went_idle = daemon.windows.went_idle(daemon.policies, daemon.host.domains, now)
    for name, idle_now in went_idle.items():
        for domain in idle_now:
            log.info("domain.idle", domain=domain.name, policy=name,
                     window_left_s=round(domain.window_left_s))  # fmt: skip
        policy = daemon.policy_named(name)
        if policy is not None:
            select_candidates(daemon, policy, only={d.uuid for d in idle_now})


def start_due(daemon: Daemon, now: float) -> None:
    """Close the windows whose time is up, then start the queued jobs that may start now."""
    for closed in daemon.windows.close_due(now):
        log_closed(daemon, closed)
    if daemon.host.hypervisor is None or daemon.flags.stop:
        return
    decided = daemon.windows.dispatch(
        daemon.policies, daemon.host.domains, running=daemon.running,
        max_jobs=daemon.daemon_config.max_concurrent_jobs, now=now,
    )  # fmt: skip
    for candidate, reason in decided:
        if reason is None:
            _start_job(daemon, candidate)
        else:
            log.info("domain.skipped", domain=candidate.name, policy=candidate.policy,
                     reason=reason)  # fmt: skip
            daemon.metrics.observations.skipped(candidate.name, reason)


def log_closed(daemon: Daemon, closed: windows.Closed) -> None:
    """Report a window that closed (and have the metrics written)."""
    log.info("window.closed", policy=closed.policy, why=closed.why,
             not_started=closed.not_started, stayed_busy=closed.stayed_busy)  # fmt: skip
    daemon.write_metrics()


def _start_job(daemon: Daemon, candidate: Candidate) -> None:
    policy = daemon.policy_named(candidate.policy)
    assert policy is not None  # noqa: S101 - checked by Windows.dispatch
    log.info("job.starting", domain=candidate.name, policy=policy.name,
             estimated_gain=format_bytes(candidate.estimated_gain))  # fmt: skip
    daemon.workers.start_job(candidate, policy, daemon.daemon_config, daemon.clock())
