"""The open windows of the policies: what they queue, watch, start and leave undone.

The daemon's decisions, as a state kept by the main loop and changed only by the
methods here, each given the time (monotonic seconds) and whatever else it needs:
the domains the daemon knows, the running jobs, the journal's last reclaim as a
callable. Nothing here talks to libvirt, starts a thread, reads a clock or logs:
the methods return what they decided and the service reports and acts on it.
Why a domain is not estimated or started now is for ``eligibility`` to say.

A window opens when its policy fires and lasts ``schedule.window``. Its eligible
idle domains are estimated (on a thread of the service) and queued, largest
estimated gain first. A domain that is busy is reported once and watched while
the window is open; when it goes idle it is estimated and queued too. A job starts
while its estimate fits in what is left of the window and its domain is still
idle. A window closes when its time is up (not while its domains are being
estimated) or when the daemon stops; it says which domains stayed busy.

A daemon that starts or reloads inside a policy's window (its cron time passed less
than ``schedule.window`` ago) opens that window too, for the time it has left, once
``idle.duration`` of samples can tell idle domains from busy ones: a restart at
02:30 still reclaims in the 02:00 window.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from virt_reclaim.config import selection
from virt_reclaim.config.policy import Policy
from virt_reclaim.model import DomainObservation
from virt_reclaim.service import scheduler
from virt_reclaim.service.eligibility import (
    BUSY,
    DomainView,
    busy_reason,
    estimate_refusal,
    start_refusal,
)
from virt_reclaim.service.scheduler import Candidate, LateWindow

TIME_UP = "its time is up"
STOPPING = "the daemon is stopping"
# A candidate skipped because other jobs held the host's space reserved is tried again
# when a job ends, or after this long (the space may be held by a `run` beside the daemon).
SPACE_RETRY_S = 60.0


@dataclass(frozen=True)
class Window:
    """An open window of one policy: jobs may start until ``ends_at`` (monotonic seconds).

    ``busy`` holds the domains that were busy when it opened (uuid -> name and the latest
    reason): they are watched, and queued if they go idle before it closes.
    """

    policy: str
    ends_at: float
    busy: dict[str, tuple[str, str]] = field(default_factory=dict, compare=False)

    def left(self, now: float) -> float:
        """Seconds left in the window."""
        return max(0.0, self.ends_at - now)

    def fits(self, estimated_s: float, now: float) -> bool:
        """True when a job of ``estimated_s`` would end inside the window."""
        return estimated_s <= self.left(now)


@dataclass(frozen=True)
class Skip:
    """A domain a window does not reclaim now, and why (to report)."""

    name: str
    uuid: str
    reason: str


@dataclass
class PassDecision:
    """What one pass over a policy's domains decided.

    ``chosen`` are to be estimated (the policy now counts as being estimated);
    ``skipped`` are to be reported (a domain already watched is not reported again);
    ``nothing_to_do``: the window has no domain to estimate and none to watch.
    """

    chosen: list[DomainObservation] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    nothing_to_do: bool = False


@dataclass(frozen=True)
class WentIdle:
    """A watched domain that is idle now."""

    uuid: str
    name: str
    window_left_s: float


@dataclass(frozen=True)
class Closed:
    """A window that closed: why, the queued jobs it did not start, the domains still busy."""

    policy: str
    why: str
    not_started: list[str]
    stayed_busy: dict[str, str]


class Windows:
    """The open windows, the queue of estimated candidates, the policies being estimated."""

    def __init__(self) -> None:
        self.open: dict[str, Window] = {}
        self.queue: list[Candidate] = []
        self.estimating: set[str] = set()
        self.late: dict[str, LateWindow] = {}
        # Queued candidates waiting for the host's space, by uuid: not before this time.
        self.held: dict[str, float] = {}

    def apply(self, policies: Sequence[Policy]) -> None:
        """After a reload: forget the windows (and their queue) of policies that are gone.

        Windows found open at the last start or reload are looked for again
        (``find_late``): a changed schedule may have moved them.
        """
        names = {p.name for p in policies}
        self.open = {n: w for n, w in self.open.items() if n in names}
        self.queue = [c for c in self.queue if c.policy in self.open]
        self.late = {}

    def find_late(
        self, policies: Iterable[Policy], now: float, wall: dt.datetime
    ) -> list[LateWindow]:
        """At start or reload: the enabled policies' windows open now that no firing opened.

        ``wall`` is the time of day (aware) that ``now`` is. Each opens once
        ``idle.duration`` has passed (see ``due_late``), unless its policy fires first.
        """
        found = []
        for policy in policies:
            if not policy.enabled or policy.name in self.open or policy.name in self.late:
                continue
            if (late := scheduler.late_window(policy, now, wall)) is not None:
                self.late[policy.name] = late
                found.append(late)
        return found

    def due_late(self, now: float) -> list[LateWindow]:
        """The windows found late whose time to open has come (they are no longer pending)."""
        due = [late for late in self.late.values() if late.opens_at <= now]
        for late in due:
            del self.late[late.policy]
        return due

    def open_window(self, policy: Policy, now: float, ends_at: float | None = None) -> Window:
        """The policy fired: open its window from ``now`` (until ``ends_at`` for a late one).

        A firing while the window is open reopens it from now; the busy domains it
        watches stay watched (and are not reported as skipped again).
        """
        self.late.pop(policy.name, None)  # its own firing came first
        previous = self.open.get(policy.name)
        busy = previous.busy if previous is not None else {}
        if ends_at is None:
            ends_at = now + policy.schedule.window.total_seconds()
        window = Window(policy.name, ends_at, busy)
        self.open[policy.name] = window
        return window

    def may_select(self, policy: str) -> bool:
        """True when the policy's window is open and its domains are not being estimated."""
        return policy in self.open and policy not in self.estimating

    def select(
        self,
        policy: Policy,
        policies: Sequence[Policy],
        domains: Mapping[str, DomainView],
        *,
        running: Collection[str],
        last_reclaimed_at: Callable[[str], float | None],
        wall: float,
        only: Collection[str] | None = None,
    ) -> PassDecision:
        """Pick the policy's eligible idle domains (or those among ``only``) to estimate.

        ``policies`` decide which policy governs each domain; ``running`` holds the uuids
        of running jobs; ``last_reclaimed_at(uuid)`` reads the journal (wall-clock seconds,
        may raise JournalError) and ``wall`` is the wall-clock time for the min_interval.
        A busy domain is watched by the window; any other reason ends its watch.
        """
        result = PassDecision()
        window = self.open.get(policy.name)
        if window is None or policy.name in self.estimating:
            return result
        for uuid, view in sorted(domains.items(), key=lambda kv: kv[1].observed.name):
            observed = view.observed
            if only is not None and uuid not in only:
                continue
            choice = selection.select(policies, observed.name, observed.uuid, observed.xml)
            if choice.policy is None or choice.policy.name != policy.name:
                continue
            reason = estimate_refusal(
                uuid, view, policy, running=running, last_reclaimed_at=last_reclaimed_at, wall=wall
            )
            if reason is None:
                window.busy.pop(uuid, None)
                result.chosen.append(observed)
                continue
            watched = uuid in window.busy
            if reason.startswith(BUSY):
                window.busy[uuid] = (observed.name, reason)
            else:
                window.busy.pop(uuid, None)
            if not watched:
                result.skipped.append(Skip(observed.name, uuid, reason))
        if result.chosen:
            self.estimating.add(policy.name)
        else:
            result.nothing_to_do = only is None and not window.busy
        return result

    def went_idle(
        self, policies: Iterable[Policy], domains: Mapping[str, DomainView], now: float
    ) -> dict[str, list[WentIdle]]:
        """After a sample: the watched domains of each open window that are idle now.

        A watched domain that is gone stops being watched; one still busy keeps its
        latest reason. Windows whose domains are being estimated wait for the next sample.
        """
        by_name = _by_name(policies)
        found: dict[str, list[WentIdle]] = {}
        for name, window in self.open.items():
            policy = by_name.get(name)
            if policy is None or not window.busy or name in self.estimating:
                continue
            for uuid, (domain, _reason) in list(window.busy.items()):
                view = domains.get(uuid)
                if view is None:
                    del window.busy[uuid]
                    continue
                busy = busy_reason(view, policy)
                if busy is None:
                    found.setdefault(name, []).append(WentIdle(uuid, domain, window.left(now)))
                else:
                    window.busy[uuid] = (domain, f"{BUSY}{busy}")
        return found

    def estimated(self, policy: str, candidates: Iterable[Candidate]) -> list[Candidate]:
        """The dry runs of a policy's domains are back: queue them; return those new to it.

        Nothing is queued once the window closed, nor a domain already queued.
        """
        self.estimating.discard(policy)
        if policy not in self.open:
            return []
        queued = {c.uuid for c in self.queue}
        fresh = [c for c in candidates if c.uuid not in queued]
        self.queue = scheduler.queue_order([*self.queue, *fresh])
        return fresh

    def wait_for_space(self, candidate: Candidate, now: float) -> bool:
        """Queue ``candidate`` again, held until a job ends or SPACE_RETRY_S pass.

        Its job was skipped only because other jobs held the host's space reserved.
        False when its window has closed meanwhile (it is then not queued).
        """
        if candidate.policy not in self.open:
            return False
        if all(c.uuid != candidate.uuid for c in self.queue):
            self.queue = scheduler.queue_order([*self.queue, candidate])
        self.held[candidate.uuid] = now + SPACE_RETRY_S
        return True

    def job_ended(self) -> None:
        """A job ended and gave back its reservations: those waiting for space may try."""
        self.held.clear()

    def close_due(self, now: float) -> list[Closed]:
        """Close the windows whose time is up (not while their domains are being estimated)."""
        due = [n for n, w in self.open.items() if w.left(now) <= 0 and n not in self.estimating]
        return [self.close(name, TIME_UP) for name in due]

    def close(self, name: str, why: str) -> Closed:
        """Close a window; its queued candidates are dropped."""
        window = self.open.pop(name)
        closed = Closed(
            policy=name,
            why=why,
            not_started=[c.name for c in self.queue if c.policy == name],
            stayed_busy=dict(window.busy.values()),
        )
        self.queue = [c for c in self.queue if c.policy != name]
        return closed

    def dispatch(
        self,
        policies: Iterable[Policy],
        domains: Mapping[str, DomainView],
        *,
        running: Collection[str],
        max_jobs: int,
        now: float,
    ) -> list[tuple[Candidate, str | None]]:
        """Go through the queue in order: which candidates start now, which are dropped.

        Returns (candidate, None) for each to start and (candidate, reason) for each
        dropped, in queue order. The others wait in the queue: over ``max_jobs``
        running (counting those started here), or a job of their domain still runs.
        A candidate dropped for being busy is watched by its window again.
        """
        by_name = _by_name(policies)
        decided: list[tuple[Candidate, str | None]] = []
        running_now = set(running)
        waiting: list[Candidate] = []
        for candidate in self.queue:
            if len(running_now) >= max_jobs:
                waiting.append(candidate)
                continue
            window = self.open.get(candidate.policy)
            policy = by_name.get(candidate.policy)
            view = domains.get(candidate.uuid)
            left = window.left(now) if window is not None else None
            reason = start_refusal(candidate, policy, view, window_left_s=left, running=running_now)
            if reason is None and self.held.get(candidate.uuid, now) > now:
                reason = "wait"
            if reason == "wait":
                waiting.append(candidate)
                continue
            decided.append((candidate, reason))
            self.held.pop(candidate.uuid, None)
            if reason is None:
                running_now.add(candidate.uuid)
            elif window is not None and reason.startswith(BUSY):
                window.busy[candidate.uuid] = (candidate.name, reason)
        self.queue = waiting
        return decided


def _by_name(policies: Iterable[Policy]) -> dict[str, Policy]:
    found: dict[str, Policy] = {}
    for policy in policies:
        found.setdefault(policy.name, policy)
    return found
