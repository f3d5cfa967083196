"""Whether a domain may be estimated or its job started now, and if not, why (pure).

Each check returns a reason or None. A reason that starts with ``BUSY`` says the domain is
not idle, which a later sample may change: its window watches it. The windows
(``windows.Windows``) ask these questions; the metrics count skips by these reasons.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from virt_reclaim.config.policy import Policy
from virt_reclaim.journal.records import JournalError
from virt_reclaim.model import DomainObservation, DomainState
from virt_reclaim.service import idle, scheduler
from virt_reclaim.service.scheduler import Candidate

# The prefix of the reasons that say a domain is not idle (a later sample may say it is).
BUSY = "busy: "
GONE = "its policy or the domain is gone"


@dataclass
class DomainView:
    """What the daemon knows of a domain: its latest observation and its statistics samples."""

    observed: DomainObservation
    recent: idle.RecentSamples = field(default_factory=lambda: idle.RecentSamples(0.0))


def busy_reason(view: DomainView, policy: Policy) -> str | None:
    """Why the domain is not idle by the policy's measure, or None (a shut-off one is idle)."""
    if view.observed.state is DomainState.SHUTOFF:
        return None
    if not policy.idle.required:
        return None  # a live policy that reclaims busy guests too (no downtime, throttled)
    limits = idle.Thresholds(
        cpu_percent=policy.idle.cpu_percent,
        disk_bytes_per_s=float(policy.idle.disk_bytes_per_s),
        net_bytes_per_s=float(policy.idle.net_bytes_per_s),
        duration_s=policy.idle.duration.total_seconds(),
    )
    return idle.samples_busy_reason(view.recent, limits)


def estimate_refusal(
    uuid: str,
    view: DomainView,
    policy: Policy,
    *,
    running: Collection[str],
    last_reclaimed_at: Callable[[str], float | None],
    wall: float,
) -> str | None:
    """Why the domain is not to be estimated now, or None.

    ``running`` holds the uuids of running jobs; ``last_reclaimed_at(uuid)`` reads the journal
    (wall-clock seconds, may raise JournalError); ``wall`` is the wall-clock time now.
    """
    if uuid in running:
        return "a job for it is running"
    try:
        last = last_reclaimed_at(uuid)
    except JournalError as exc:
        return f"the journal cannot be read: {exc}"
    left = scheduler.interval_left(last, wall, policy.schedule.min_interval.total_seconds())
    if left > 0:
        return f"reclaimed recently: min_interval leaves {left / 3600:.1f} h to wait"
    busy = busy_reason(view, policy)
    if busy is not None:
        return f"{BUSY}{busy}"
    return None


def start_refusal(
    candidate: Candidate,
    policy: Policy | None,
    view: DomainView | None,
    *,
    window_left_s: float | None,
    running: Collection[str],
) -> str | None:
    """Why the candidate must not start now (None: start; "wait": later).

    ``window_left_s`` is what is left of its policy's window (None: the window is closed).
    """
    if window_left_s is None or policy is None or view is None:
        return GONE
    if candidate.uuid in running:
        return "wait"
    if candidate.estimated_s > window_left_s:
        return (f"estimated {candidate.estimated_s / 60:.0f} min does not fit in the "
                f"{window_left_s / 60:.0f} min left of the window")  # fmt: skip
    busy = busy_reason(view, policy)
    if busy is not None:
        return f"{BUSY}{busy}"
    return None
