"""The scheduler's decisions: queue order, a job's duration and gain, minimum interval, rate.

(Whether a job fits in what is left of a window: test_windows.py.)
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from virt_reclaim.config.policy import Policy
from virt_reclaim.service import scheduler
from virt_reclaim.service.scheduler import Candidate

MIB = 1024 * 1024


def candidate(name: str, gain: int, seconds: float = 60) -> Candidate:
    return Candidate(name, f"uuid-{name}", "p", bytes_before=gain * 2, estimated_gain=gain,
                     estimated_s=seconds)  # fmt: skip


def test_queue_puts_the_largest_gain_first_and_breaks_ties_by_name() -> None:
    queue = scheduler.queue_order(
        [candidate("b", 10), candidate("a", 10), candidate("c", 99), candidate("d", 0)]
    )
    assert [c.name for c in queue] == ["c", "a", "b", "d"]


@given(st.lists(st.tuples(st.text(min_size=1, max_size=5), st.integers(0, 10**12)), max_size=20))
def test_queue_order_is_by_gain_whatever_the_input(items: list[tuple[str, int]]) -> None:
    queue = scheduler.queue_order(candidate(n, g) for n, g in items)
    gains = [c.estimated_gain for c in queue]
    assert gains == sorted(gains, reverse=True)
    assert len(queue) == len(items)


def test_estimate_counts_shutdown_rewrite_verify_and_restart() -> None:
    seconds = scheduler.estimate_job_seconds(1000 * MIB, 100 * MIB, shutdown_timeout_s=120)
    assert seconds == 120 + 2 * 10 + scheduler.RESTART_ALLOWANCE_S


def test_rate_is_the_median_of_this_hosts_rewrites_or_a_cautious_default() -> None:
    assert scheduler.typical_rewrite_rate([]) == scheduler.DEFAULT_REWRITE_RATE
    assert scheduler.typical_rewrite_rate([0.0, -1.0]) == scheduler.DEFAULT_REWRITE_RATE
    assert scheduler.typical_rewrite_rate([50.0, 300.0, 200.0]) == 200.0


def test_minimum_interval_counts_from_the_last_reclaim() -> None:
    day = 86400.0
    assert scheduler.interval_left(None, now=10 * day, min_interval_s=7 * day) == 0
    assert scheduler.interval_left(5 * day, now=10 * day, min_interval_s=7 * day) == 2 * day
    assert scheduler.interval_left(2 * day, now=10 * day, min_interval_s=7 * day) == 0


def test_a_candidate_adds_up_its_disks_and_a_disk_without_an_estimate_frees_nothing() -> None:
    policy = Policy.model_validate({
        "name": "p", "match": {"names": ["*"]},
        "schedule": {"cron": "0 2 * * *"}, "shutdown": {"timeout": "90s"},
    })  # fmt: skip
    made = scheduler.candidate(
        "vm", "uuid-vm", policy, [(1000 * MIB, 400 * MIB), (200 * MIB, None)], 100 * MIB
    )
    assert made == Candidate(
        "vm", "uuid-vm", "p", bytes_before=1200 * MIB, estimated_gain=600 * MIB,
        estimated_s=90 + 2 * 12 + scheduler.RESTART_ALLOWANCE_S,
    )  # fmt: skip
