"""Idle checks fed with samples and times chosen by the test (no clock, no sleep)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virt_reclaim.service.idle import (
    RecentSamples,
    StatsSample,
    Thresholds,
    sample_from_stats,
    samples_busy_reason,
)

LIMITS = Thresholds(cpu_percent=5.0, disk_bytes_per_s=1_000_000, net_bytes_per_s=100_000,
                    duration_s=600)  # fmt: skip
SECOND = 1_000_000_000


def recent_of(*samples: StatsSample) -> RecentSamples:
    recent = RecentSamples(LIMITS.duration_s)
    for sample in samples:
        recent.add(sample)
    return recent


def quiet(at: float, step: int = 0) -> StatsSample:
    # 1 % CPU, 100 kB/s disk, 1 kB/s network since t=0.
    return StatsSample(at, cpu_ns=int(at * SECOND // 100), block_bytes=int(at * 100_000),
                  net_bytes=int(at * 1_000) + step)  # fmt: skip


def test_quiet_for_the_whole_duration_is_idle() -> None:
    assert samples_busy_reason(recent_of(*(quiet(t) for t in range(0, 661, 60))), LIMITS) is None


def test_too_short_an_observation_counts_as_busy() -> None:
    assert samples_busy_reason(recent_of(quiet(0)), LIMITS) == "not observed yet"
    reason = samples_busy_reason(recent_of(quiet(0), quiet(300)), LIMITS)
    assert reason == "observed for 300 s of the 600 s required"


@pytest.mark.parametrize(
    ("burst", "expected"),
    [
        ({"cpu_ns": 30 * SECOND}, "CPU 51.0 % above 5 %"),
        ({"block_bytes": 600_000_000}, "disk 10100000.0 B/s above 1e+06 B/s"),
        ({"net_bytes": 60_000_000}, "network 1001000.0 B/s above 100000 B/s"),
    ],
)
def test_one_busy_minute_inside_the_window_is_busy(burst: dict[str, int], expected: str) -> None:
    samples = [quiet(t) for t in range(0, 661, 60)]
    fields = ("cpu_ns", "block_bytes", "net_bytes")
    bumped = [
        StatsSample(s.at, **{k: getattr(s, k) + burst.get(k, 0) for k in fields})
        for s in samples[6:]
    ]
    assert samples_busy_reason(recent_of(*samples[:6], *bumped), LIMITS) == expected


def test_missing_or_reset_counters_count_as_busy() -> None:
    missing = StatsSample(660, cpu_ns=None, block_bytes=0, net_bytes=0)
    assert samples_busy_reason(recent_of(quiet(0), missing), LIMITS) == "CPU statistics unavailable"
    before = StatsSample(0, cpu_ns=10 * SECOND, block_bytes=10**6, net_bytes=10**6)
    reset = StatsSample(660, cpu_ns=0, block_bytes=0, net_bytes=0)
    assert samples_busy_reason(recent_of(before, reset), LIMITS) == (
        "CPU counters went back (the guest restarted?)"
    )


def test_window_keeps_only_what_covers_the_duration() -> None:
    recent = recent_of(*(quiet(t) for t in range(0, 3601, 60)))
    assert recent.samples[0].at == 3000
    assert recent.samples[-1].at == 3600


def test_sample_from_a_getalldomainstats_record() -> None:
    record = {
        "state.state": 1, "cpu.time": 5 * SECOND,
        "block.count": 2, "block.0.rd.bytes": 10, "block.0.wr.bytes": 20,
        "block.1.rd.bytes": 1, "block.1.wr.bytes": 2,
        "net.count": 1, "net.0.rx.bytes": 100, "net.0.tx.bytes": 50,
    }  # fmt: skip
    assert sample_from_stats(record, 7.0) == StatsSample(7.0, 5 * SECOND, 33, 150)
    assert sample_from_stats({"cpu.time": 1}, 0).block_bytes is None
    broken = {**record, "block.1.wr.bytes": "lots"}
    assert sample_from_stats(broken, 0).block_bytes is None


@given(st.lists(st.tuples(st.integers(0, 10**12), st.integers(0, 10**12), st.integers(0, 10**12)),
                min_size=0, max_size=30))  # fmt: skip
def test_any_samples_give_a_reason_or_none_never_an_error(
    counters: list[tuple[int, int, int]],
) -> None:
    recent = recent_of(*(StatsSample(60.0 * i, c, b, n) for i, (c, b, n) in enumerate(counters)))
    reason = samples_busy_reason(recent, LIMITS)
    assert reason is None or isinstance(reason, str)
