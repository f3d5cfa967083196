"""The daemon's window decisions, fed with the times and samples chosen by the test.

No libvirt, no thread, no clock: a window opens at t=1000 (monotonic seconds) for
ten minutes; domains are idle or busy by the samples the test gives them.
"""

from __future__ import annotations

import ast
import datetime as dt
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from virt_reclaim.config.policy import Policy
from virt_reclaim.journal.records import JournalError
from virt_reclaim.model import DomainObservation, DomainState
from virt_reclaim.service import eligibility, windows
from virt_reclaim.service.eligibility import DomainView
from virt_reclaim.service.idle import StatsSample
from virt_reclaim.service.scheduler import Candidate, LateWindow
from virt_reclaim.service.windows import Window, Windows

OPEN = 1000.0  # when the window opens
LENGTH = 600.0  # schedule.window = 10m
IDLE_S = 60.0  # idle.duration = 60s
DAY = 86400.0
WALL = 1_700_000_000.0  # the wall clock, for the min_interval
SECOND_NS = 1_000_000_000


def policy(name: str = "p", names: tuple[str, ...] = ("vm-*",), **extra: Any) -> Policy:
    return Policy.model_validate({
        "name": name,
        "match": {"names": list(names)},
        "schedule": {"cron": "0 2 * * *", "window": "10m", "min_interval": "7d"},
        "shutdown": {"timeout": "60s"},
        **extra,
        "idle": {"duration": "60s", "cpu_percent": 5, **extra.get("idle", {})},
    })  # fmt: skip


def view(name: str, state: DomainState = DomainState.RUNNING) -> DomainView:
    return DomainView(DomainObservation(name, f"uuid-{name}", state, True, "<domain/>"))


def feed(domain: DomainView, start: float, end: float, cpu_percent: float) -> None:
    """Samples every 10 s from ``start`` to ``end`` at this CPU use (no disk or network)."""
    last = domain.recent.samples[-1] if domain.recent.samples else None
    cpu = last.cpu_ns if last and last.cpu_ns is not None else 0
    at = start
    domain.recent.duration_s = IDLE_S
    while at <= end:
        if last is not None:
            cpu += int((at - last.at) * SECOND_NS * cpu_percent / 100)
        last = StatsSample(at, cpu_ns=cpu, block_bytes=0, net_bytes=0)
        domain.recent.add(last)
        at += 10


def idle_view(name: str, until: float = OPEN) -> DomainView:
    domain = view(name)
    feed(domain, until - 2 * IDLE_S, until, cpu_percent=1)
    return domain


def busy_view(name: str, until: float = OPEN) -> DomainView:
    domain = view(name)
    feed(domain, until - 2 * IDLE_S, until, cpu_percent=90)
    return domain


def by_uuid(*views: DomainView) -> dict[str, DomainView]:
    return {v.observed.uuid: v for v in views}


def never_reclaimed(_uuid: str) -> float | None:
    return None


def select(
    book: Windows,
    p: Policy,
    domains: dict[str, DomainView],
    *,
    running: set[str] | None = None,
    last_reclaimed_at: Any = never_reclaimed,
    only: set[str] | None = None,
    policies: list[Policy] | None = None,
) -> windows.PassDecision:
    return book.select(
        p, policies or [p], domains, running=running or set(),
        last_reclaimed_at=last_reclaimed_at, wall=WALL, only=only,
    )  # fmt: skip


def candidate(name: str, gain: int, seconds: float = 300, policy: str = "p") -> Candidate:
    return Candidate(name, f"uuid-{name}", policy, bytes_before=2 * gain, estimated_gain=gain,
                     estimated_s=seconds)  # fmt: skip


def opened(p: Policy | None = None, now: float = OPEN) -> Windows:
    book = Windows()
    book.open_window(p or policy(), now)
    return book


# -- opening ------------------------------------------------------------------------------


def test_a_firing_opens_the_window_for_the_policys_length() -> None:
    book = Windows()
    window = book.open_window(policy(), now=OPEN)
    assert window == Window("p", ends_at=OPEN + LENGTH)
    assert book.open == {"p": window}
    assert window.left(OPEN + 100) == LENGTH - 100
    assert book.may_select("p")
    assert not book.may_select("other")


# The wall clock when the daemon starts: 35 minutes after a "0 2 * * *" policy's cron time.
LATE_WALL = dt.datetime(2026, 11, 24, 2, 35, tzinfo=dt.UTC)


def test_a_window_open_when_the_daemon_starts_opens_once_idleness_can_be_judged() -> None:
    nightly = policy(schedule={"cron": "0 2 * * *", "window": "4h"})
    book = Windows()

    [late] = book.find_late([nightly], OPEN, LATE_WALL)

    assert late == LateWindow("p", opens_at=OPEN + IDLE_S, ends_at=OPEN + 4 * 3600 - 35 * 60,
                              late_s=35 * 60)  # fmt: skip
    assert book.find_late([nightly], OPEN, LATE_WALL) == []  # found once
    assert book.due_late(OPEN + IDLE_S - 1) == []
    assert book.due_late(OPEN + IDLE_S) == [late]
    assert book.due_late(OPEN + IDLE_S) == []  # handed over once
    window = book.open_window(nightly, OPEN + IDLE_S, late.ends_at)
    assert window.left(OPEN + IDLE_S) == 4 * 3600 - 35 * 60 - IDLE_S


def test_a_closed_window_a_disabled_policy_or_an_open_one_is_not_found_late() -> None:
    closed = policy("closed", schedule={"cron": "0 2 * * *", "window": "10m"})
    disabled = policy("off", enabled=False, schedule={"cron": "0 2 * * *", "window": "4h"})
    already = policy("open", schedule={"cron": "0 2 * * *", "window": "4h"})
    book = opened(already)

    assert book.find_late([closed, disabled, already], OPEN, LATE_WALL) == []


def test_a_firing_before_the_late_window_opens_replaces_it() -> None:
    nightly = policy(schedule={"cron": "* * * * *", "window": "10m"})
    book = Windows()
    book.find_late([nightly], OPEN, LATE_WALL)

    book.open_window(nightly, OPEN + 10)

    assert book.due_late(OPEN + IDLE_S) == []
    assert book.open["p"].ends_at == OPEN + 10 + LENGTH


def test_a_late_window_shorter_than_idle_duration_opens_for_what_is_left() -> None:
    # 02:09:30 in a 10 min window: 30 s left, less than the 60 s of idle.duration.
    nightly = policy(schedule={"cron": "0 2 * * *", "window": "10m"})
    [late] = Windows().find_late([nightly], OPEN, LATE_WALL.replace(minute=9, second=30))
    assert late.opens_at == late.ends_at == OPEN + 30


def test_a_job_starts_only_when_its_estimate_fits_in_what_is_left() -> None:
    window = Window("p", ends_at=1000.0)
    assert window.fits(400, now=600)
    assert not window.fits(401, now=600)
    assert window.left(now=1200) == 0
    assert not window.fits(0.1, now=1000.0 - 0.05)


def test_idle_domains_are_chosen_and_a_busy_one_is_reported_and_watched() -> None:
    p = policy()
    book = opened(p)
    domains = by_uuid(idle_view("vm-b"), busy_view("vm-c"), idle_view("other"),
                      view("vm-a", DomainState.SHUTOFF))  # fmt: skip

    chosen = select(book, p, domains)

    # By name; a shut-off domain is idle; a domain no policy of ours selects is not looked at.
    assert [s.name for s in chosen.chosen] == ["vm-a", "vm-b"]
    [skip] = chosen.skipped
    assert (skip.name, skip.uuid) == ("vm-c", "uuid-vm-c")
    assert skip.reason.startswith("busy: CPU")
    assert book.open["p"].busy == {"uuid-vm-c": ("vm-c", skip.reason)}
    assert not chosen.nothing_to_do
    # Being estimated: no second selection until the estimates are back.
    assert book.estimating == {"p"}
    assert not book.may_select("p")
    assert select(book, p, domains) == windows.PassDecision()


def test_a_domain_never_observed_counts_as_busy() -> None:
    p = policy()
    book = opened(p)
    [skip] = select(book, p, by_uuid(view("vm-new"))).skipped
    assert skip.reason == "busy: not observed yet"


def test_a_domain_of_a_policy_with_a_higher_priority_is_left_to_that_one() -> None:
    p, greedy = policy(), policy("greedy", ("vm-a",), priority=10)
    book = opened(p)
    chosen = select(book, p, by_uuid(idle_view("vm-a"), idle_view("vm-b")), policies=[p, greedy])
    assert [s.name for s in chosen.chosen] == ["vm-b"]


def test_nothing_to_do_only_without_a_domain_to_estimate_or_to_watch() -> None:
    p = policy()
    book = opened(p)
    assert select(book, p, by_uuid(idle_view("other"))).nothing_to_do
    chosen = select(book, p, by_uuid(busy_view("vm-a")))
    assert not chosen.nothing_to_do and not chosen.chosen


def test_a_domain_whose_job_runs_is_skipped_and_not_watched() -> None:
    p = policy()
    book = opened(p)
    chosen = select(book, p, by_uuid(idle_view("vm-a")), running={"uuid-vm-a"})
    assert [(s.name, s.reason) for s in chosen.skipped] == [("vm-a", "a job for it is running")]
    assert book.open["p"].busy == {}


# -- the minimum interval -----------------------------------------------------------------


def test_a_domain_reclaimed_within_min_interval_is_skipped_with_the_time_to_wait() -> None:
    p = policy()
    book = opened(p)
    last = {"uuid-vm-a": WALL - 2 * DAY, "uuid-vm-b": WALL - 8 * DAY}
    chosen = select(book, p, by_uuid(idle_view("vm-a"), idle_view("vm-b")),
                    last_reclaimed_at=last.get)  # fmt: skip
    assert [s.name for s in chosen.chosen] == ["vm-b"]
    assert [(s.name, s.reason) for s in chosen.skipped] == [
        ("vm-a", "reclaimed recently: min_interval leaves 120.0 h to wait")
    ]
    # Waiting for days is not being busy: the window does not watch it.
    assert book.open["p"].busy == {}


def test_an_unreadable_journal_skips_the_domain_with_the_reason() -> None:
    def broken(_uuid: str) -> float | None:
        raise JournalError("database disk image is malformed")

    p = policy()
    book = opened(p)
    chosen = select(book, p, by_uuid(idle_view("vm-a")), last_reclaimed_at=broken)
    assert [s.reason for s in chosen.skipped] == [
        "the journal cannot be read: database disk image is malformed"
    ]


# -- watching busy domains ----------------------------------------------------------------


def test_a_busy_domain_is_watched_and_queued_once_it_goes_idle_within_the_window() -> None:
    p = policy()
    book = opened(p)
    busy = busy_view("vm-b")
    domains = by_uuid(idle_view("vm-a"), busy)
    select(book, p, domains)
    # While vm-a is being estimated, the watch waits.
    feed(busy, OPEN + 10, OPEN + 120, cpu_percent=1)
    assert book.went_idle([p], domains, now=OPEN + 120) == {}
    assert book.estimated("p", [candidate("vm-a", 100)]) == [candidate("vm-a", 100)]

    # Still busy over the last minute at +60: watched, with the latest reason.
    assert book.went_idle([p], by_uuid(busy_view("vm-b", until=OPEN + 60)), now=OPEN + 60) == {}
    assert book.open["p"].busy["uuid-vm-b"][1].startswith("busy: CPU")
    # Quiet for a minute by +120: idle, with what is left of the window.
    assert book.went_idle([p], domains, now=OPEN + 120) == {
        "p": [windows.WentIdle("uuid-vm-b", "vm-b", LENGTH - 120)]
    }

    chosen = select(book, p, domains, only={"uuid-vm-b"})
    assert [s.name for s in chosen.chosen] == ["vm-b"]
    assert chosen.skipped == [] and not chosen.nothing_to_do
    assert book.open["p"].busy == {}
    assert book.estimated("p", [candidate("vm-b", 500)]) == [candidate("vm-b", 500)]
    assert [c.name for c in book.queue] == ["vm-b", "vm-a"]
    started = book.dispatch([p], domains, running=set(), max_jobs=2, now=OPEN + 121)
    assert started == [(candidate("vm-b", 500), None), (candidate("vm-a", 100), None)]
    assert book.queue == []


def test_a_job_skipped_for_space_others_hold_waits_for_a_job_to_end_or_the_retry_time() -> None:
    p = policy()
    book = opened(p)
    domains = by_uuid(idle_view("vm-a"), idle_view("vm-b"))
    first = candidate("vm-a", 100)
    assert book.estimated("p", [first]) == [first]
    assert book.dispatch([p], domains, running=set(), max_jobs=2, now=OPEN + 10) == [(first, None)]

    # vm-a's job found its space held by another job's reservation: queued again, held.
    assert book.wait_for_space(first, now=OPEN + 20)
    assert book.dispatch([p], domains, running=set(), max_jobs=2, now=OPEN + 21) == []
    assert book.queue == [first]
    # Another job ended, its reservation gone: vm-a may try again at once.
    book.job_ended()
    assert book.dispatch([p], domains, running=set(), max_jobs=2, now=OPEN + 22) == [(first, None)]
    # Held again; with no job ending (the space held by a `run`), it tries after the retry time.
    assert book.wait_for_space(first, now=OPEN + 30)
    assert book.dispatch([p], domains, running=set(), max_jobs=2, now=OPEN + 89) == []
    assert book.dispatch([p], domains, running=set(), max_jobs=2, now=OPEN + 90) == [(first, None)]
    # Once the window is closed, nothing is queued again.
    book.close("p", windows.TIME_UP)
    assert not book.wait_for_space(first, now=OPEN + 100)
    assert book.queue == []


def test_a_watched_domain_that_is_gone_is_no_longer_watched() -> None:
    p = policy()
    book = opened(p)
    select(book, p, by_uuid(busy_view("vm-a")))
    assert book.went_idle([p], {}, now=OPEN + 60) == {}
    assert book.open["p"].busy == {}


def test_a_second_firing_reopens_the_window_without_reporting_its_busy_domains_again() -> None:
    p = policy()
    book = opened(p)
    domains = by_uuid(busy_view("vm-b"))
    first = select(book, p, domains)
    assert [s.name for s in first.skipped] == ["vm-b"]

    window = book.open_window(p, now=OPEN + 300)
    assert window.ends_at == OPEN + 300 + LENGTH
    assert set(window.busy) == {"uuid-vm-b"}
    again = select(book, p, by_uuid(busy_view("vm-b", until=OPEN + 300)))
    assert again.skipped == [] and again.chosen == []
    assert not again.nothing_to_do  # it still watches vm-b
    # Closing at the old end would be wrong: it is open until the new one.
    assert book.close_due(OPEN + LENGTH) == []


# -- starting jobs ------------------------------------------------------------------------


def test_the_queue_is_ordered_by_estimated_gain_and_takes_a_domain_once() -> None:
    book = opened()
    fresh = book.estimated("p", [candidate("small", 10), candidate("big", 99)])
    assert [c.name for c in fresh] == ["small", "big"]
    again = book.estimated("p", [candidate("big", 99), candidate("tie", 10)])
    assert [c.name for c in again] == ["tie"]
    assert [c.name for c in book.queue] == ["big", "small", "tie"]


def test_jobs_start_largest_gain_first_up_to_the_limit_and_the_others_wait() -> None:
    p = policy()
    book = opened(p)
    domains = by_uuid(*(idle_view(n) for n in ("a", "b", "c", "d")))
    book.estimated(
        "p", [candidate("a", 1), candidate("b", 3), candidate("c", 2), candidate("d", 4)]
    )

    # d's domain still has a job running (of an earlier window): d waits, b starts.
    decided = book.dispatch([p], domains, running={"uuid-d", "uuid-x"}, max_jobs=3, now=OPEN)
    assert decided == [(candidate("b", 3), None)]
    assert [c.name for c in book.queue] == ["d", "c", "a"]

    decided = book.dispatch([p], domains, running=set(), max_jobs=2, now=OPEN + 1)
    assert decided == [(candidate("d", 4), None), (candidate("c", 2), None)]
    assert [c.name for c in book.queue] == ["a"]


def test_a_job_that_no_longer_fits_in_what_is_left_of_the_window_is_dropped() -> None:
    p = policy()
    book = opened(p)
    domains = by_uuid(idle_view("vm-a", until=OPEN + 300), idle_view("vm-b", until=OPEN + 300))
    book.estimated("p", [candidate("vm-a", 99, seconds=420), candidate("vm-b", 9, seconds=300)])

    decided = book.dispatch([p], domains, running=set(), max_jobs=1, now=OPEN + 300)

    assert decided == [
        (candidate("vm-a", 99, seconds=420),
         "estimated 7 min does not fit in the 5 min left of the window"),
        (candidate("vm-b", 9, seconds=300), None),
    ]  # fmt: skip
    assert book.queue == []
    assert book.open["p"].busy == {}  # not a busy domain: not watched


def test_a_candidate_busy_again_when_its_job_would_start_is_dropped_and_watched() -> None:
    p = policy()
    book = opened(p)
    book.estimated("p", [candidate("vm-a", 5)])
    decided = book.dispatch([p], by_uuid(busy_view("vm-a")), running=set(), max_jobs=1, now=OPEN)
    [(dropped, reason)] = decided
    assert dropped.name == "vm-a"
    assert reason is not None and reason.startswith("busy: CPU")
    assert book.open["p"].busy == {"uuid-vm-a": ("vm-a", reason)}


def test_a_candidate_whose_domain_or_policy_is_gone_is_dropped() -> None:
    p = policy()
    book = opened(p)
    book.estimated("p", [candidate("vm-a", 5), candidate("vm-b", 4)])
    decided = book.dispatch([], by_uuid(idle_view("vm-a")), running=set(), max_jobs=5, now=OPEN)
    assert [r for _c, r in decided] == [eligibility.GONE, eligibility.GONE]
    book.estimated("p", [candidate("vm-b", 4)])
    decided = book.dispatch([p], {}, running=set(), max_jobs=5, now=OPEN)
    assert [r for _c, r in decided] == [eligibility.GONE]


# -- closing ------------------------------------------------------------------------------


def test_a_window_closes_when_its_time_is_up_saying_what_stayed_busy_and_did_not_start() -> None:
    p = policy()
    book = opened(p)
    select(book, p, by_uuid(idle_view("vm-a"), busy_view("vm-b")))
    assert book.close_due(OPEN + LENGTH - 1) == []
    # Not while its domains are being estimated: their candidates would be lost unseen.
    assert book.close_due(OPEN + LENGTH) == []
    book.estimated("p", [candidate("vm-a", 5, seconds=LENGTH)])

    [closed] = book.close_due(OPEN + LENGTH)

    assert closed.policy == "p" and closed.why == windows.TIME_UP == "its time is up"
    assert closed.not_started == ["vm-a"]
    assert list(closed.stayed_busy) == ["vm-b"]
    assert closed.stayed_busy["vm-b"].startswith("busy: CPU")
    assert book.open == {} and book.queue == []
    assert book.close_due(OPEN + 2 * LENGTH) == []


def test_a_stopping_daemon_closes_its_windows_with_that_reason() -> None:
    p, q = policy(), policy("q", ("db-*",))
    book = opened(p)
    book.open_window(q, OPEN + 5)
    select(book, p, by_uuid(busy_view("vm-b")))
    book.estimated("q", [candidate("db-1", 5, policy="q")])

    closed = [book.close(name, windows.STOPPING) for name in list(book.open)]

    assert [(c.policy, c.why, c.not_started) for c in closed] == [
        ("p", "the daemon is stopping", []),
        ("q", "the daemon is stopping", ["db-1"]),
    ]
    assert list(closed[0].stayed_busy) == ["vm-b"]
    assert closed[1].stayed_busy == {}


def test_estimates_that_come_back_after_the_window_closed_are_dropped() -> None:
    p = policy()
    book = opened(p)
    select(book, p, by_uuid(idle_view("vm-a")))
    book.close("p", windows.STOPPING)
    assert book.estimated("p", [candidate("vm-a", 5)]) == []
    assert book.queue == [] and book.estimating == set()


def test_a_reload_forgets_the_windows_and_queue_of_removed_policies() -> None:
    p, q = policy(), policy("q", ("db-*",))
    book = opened(p)
    book.open_window(q, OPEN)
    book.estimated("p", [candidate("vm-a", 5)])
    book.estimated("q", [candidate("db-1", 5, policy="q")])
    book.apply([q])
    assert list(book.open) == ["q"]
    assert [c.name for c in book.queue] == ["db-1"]


# -- the idle check by policy -------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        (view("off", DomainState.SHUTOFF), None),
        (view("new"), "not observed yet"),
        (idle_view("quiet"), None),
    ],
)
def test_busy_reason_by_the_policys_thresholds(domain: DomainView, expected: str | None) -> None:
    assert eligibility.busy_reason(domain, policy()) == expected


def test_busy_reason_uses_the_policys_duration_and_limit() -> None:
    domain = view("vm")
    feed(domain, OPEN - 120, OPEN, cpu_percent=20)
    assert eligibility.busy_reason(domain, policy()) == "CPU 20.0 % above 5 %"
    assert eligibility.busy_reason(domain, policy(idle={"cpu_percent": 25})) is None
    longer = policy(idle={"cpu_percent": 25, "duration": "5m"})
    assert eligibility.busy_reason(domain, longer) == "observed for 60 s of the 300 s required"


@pytest.mark.parametrize("module", [windows, eligibility])
def test_the_core_uses_no_clock_thread_libvirt_or_log(module: ModuleType) -> None:
    source = Path(str(module.__file__)).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    forbidden = {"time", "threading", "libvirt", "structlog", "os", "subprocess",
                 "virt_reclaim.virt", "virt_reclaim.service.hostview",
                 "virt_reclaim.service.workers"}  # fmt: skip
    assert not imported & forbidden


def test_a_live_policy_may_reclaim_busy_guests_and_an_offline_one_may_not() -> None:
    p = policy(mode="live", idle={"required": False})
    book = opened(p)
    chosen = select(book, p, by_uuid(busy_view("vm-c"), view("vm-new")))
    assert [s.name for s in chosen.chosen] == ["vm-c", "vm-new"]
    assert chosen.skipped == []
    with pytest.raises(ValueError, match=r'idle\.required = false needs mode = "live"'):
        policy(idle={"required": False})
