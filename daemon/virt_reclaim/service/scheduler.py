"""When policies fire (a cron trigger per policy, APScheduler 3), and what a job is worth.

APScheduler only says "policy P fires now"; the service decides what runs, with
the open windows of windows.py. The job-level decisions are pure functions here
so that they can be tested without waiting for a clock: the queue order, how long
a job may take, the minimum interval, the rewrite rate this host achieves.
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from virt_reclaim.config import crontab, loading, paths
from virt_reclaim.config.policy import Policy
from virt_reclaim.units import MIB

log = structlog.get_logger("virt_reclaim.service")

# Until this host has reclaimed something: well below the 241-267 MiB/s that
# zstd rewrites reached on the reference host (docs/rewrite-facts.md), to stay on the safe side.
DEFAULT_REWRITE_RATE = 100 * MIB
# Starting the guest again and waiting for its agent.
RESTART_ALLOWANCE_S = 120.0


@dataclass(frozen=True)
class Candidate:
    """A domain a policy's window may reclaim, with what a dry run estimated."""

    name: str
    uuid: str
    policy: str
    bytes_before: int
    estimated_gain: int
    estimated_s: float


def queue_order(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Largest estimated gain first; the name breaks ties so the order is stable."""
    return sorted(candidates, key=lambda c: (-c.estimated_gain, c.name))


def estimate_job_seconds(
    bytes_before: int, rewrite_rate: float, shutdown_timeout_s: float
) -> float:
    """How long a job may take, from shutdown to the guest's return.

    The rewrite reads ``bytes_before`` at ``rewrite_rate``; the verification reads
    both images again (counted as long as the rewrite); the shutdown may take its
    whole timeout; the restart gets RESTART_ALLOWANCE_S.
    """
    return shutdown_timeout_s + 2 * bytes_before / rewrite_rate + RESTART_ALLOWANCE_S


def candidate(
    name: str,
    uuid: str,
    policy: Policy,
    disks: Iterable[tuple[int, int | None]],
    rewrite_rate: float,
) -> Candidate:
    """The candidate a dry run makes of a domain: its disks' bytes and estimates, timed.

    ``disks`` are (bytes before, estimated after) per disk; a disk without an estimate
    counts as freeing nothing.
    """
    rows = list(disks)
    before = sum(b for b, _ in rows)
    after = sum(a or b for b, a in rows)
    return Candidate(
        name=name,
        uuid=uuid,
        policy=policy.name,
        bytes_before=before,
        estimated_gain=before - after,
        estimated_s=estimate_job_seconds(
            before, rewrite_rate, policy.shutdown.timeout.total_seconds()
        ),
    )


def typical_rewrite_rate(rates: Sequence[float]) -> float:
    """The median of the rates this host achieved, or DEFAULT_REWRITE_RATE without any."""
    usable = [r for r in rates if r > 0]
    return statistics.median(usable) if usable else float(DEFAULT_REWRITE_RATE)


def interval_left(last_reclaimed_at: float | None, now: float, min_interval_s: float) -> float:
    """Seconds until the domain may be reclaimed again (0 when it may be now)."""
    if last_reclaimed_at is None:
        return 0.0
    return max(0.0, last_reclaimed_at + min_interval_s - now)


@dataclass(frozen=True)
class LateWindow:
    """A window whose cron time passed before the daemon knew of it (at start or reload)."""

    policy: str
    opens_at: float  # monotonic: when idleness can be judged (idle.duration after)
    ends_at: float  # monotonic: its cron time + schedule.window
    late_s: float  # how long after its cron time the daemon found it open


def late_window(policy: Policy, now: float, wall: dt.datetime) -> LateWindow | None:
    """The policy's window open at ``now`` (monotonic; ``wall`` the aware time it is), or None.

    It opens once ``idle.duration`` of samples can tell idle domains from busy ones (or
    at its end, if that comes first) and ends at its cron time + ``schedule.window``.
    """
    schedule = policy.schedule
    fired = crontab.last_fire(schedule.cron, schedule.timezone, wall, schedule.window)
    if fired is None:
        return None
    late_s = (wall - fired).total_seconds()
    ends_at = now + schedule.window.total_seconds() - late_s
    opens_at = min(now + policy.idle.duration.total_seconds(), ends_at)
    return LateWindow(policy.name, opens_at, ends_at, late_s)


FireCallback = Callable[[str], None]


class PolicyScheduler:
    """One APScheduler cron job per enabled policy; firing calls ``on_fire(policy name)``.

    The callback runs on APScheduler's thread: it must only hand the news over.
    """

    def __init__(self, on_fire: FireCallback) -> None:
        """Create the (stopped) scheduler."""
        self._on_fire = on_fire
        self._scheduler = BackgroundScheduler(
            timezone=dt.UTC,
            # A window missed by a little (a busy host, a reload at the minute) still opens;
            # several missed firings open one window.
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 300},
        )

    def apply(self, policies: Sequence[Policy]) -> None:
        """Replace the triggers by those of ``policies`` (the enabled ones)."""
        self._scheduler.remove_all_jobs()
        for policy in policies:
            if not policy.enabled:
                continue
            schedule = policy.schedule
            self._scheduler.add_job(
                self._on_fire,
                crontab.trigger(schedule.cron, schedule.timezone, schedule.jitter.total_seconds()),
                args=(policy.name,),
                id=policy.name,
                name=f"policy {policy.name}",
            )

    def next_runs(self) -> dict[str, dt.datetime | None]:
        """The next firing of each policy."""
        return {job.id: job.next_run_time for job in self._scheduler.get_jobs()}

    def log_next_runs(
        self, policies: Sequence[Policy], daemon_config: loading.DaemonConfig, config_dir: str
    ) -> None:
        """Log each policy's next firing, and a warning when there is no policy at all."""
        if not policies:
            log.warning("daemon.no_policies", policy_dir=daemon_config.policy_dir
                        or os.path.join(config_dir, paths.POLICY_FOLDER))  # fmt: skip
        for name, when in self.next_runs().items():
            log.info("policy.scheduled", policy=name, next_run=when.isoformat() if when else None)

    def start(self) -> None:
        """Start firing (on APScheduler's own thread)."""
        self._scheduler.start()

    def shutdown(self) -> None:
        """Stop firing; does not wait for anything (the callbacks are instant)."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
