"""Is a guest idle? Each domain's recent statistics samples, and checks that return a reason.

A sample is what one ``getAllDomainStats`` call says of a domain: cumulative
CPU time, block bytes read+written, network bytes received+sent, taken at a
monotonic time. A check returns why the guest counts as busy, or None when it
is idle. A check that cannot decide (too few samples, missing counters,
counters that went backwards after a restart) says busy: fail safe.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StatsSample:
    """Cumulative counters of one domain at monotonic time ``at`` (seconds)."""

    at: float
    cpu_ns: int | None
    block_bytes: int | None
    net_bytes: int | None


@dataclass(frozen=True)
class Thresholds:
    """Idle means below every threshold, for ``duration_s``."""

    cpu_percent: float
    disk_bytes_per_s: float
    net_bytes_per_s: float
    duration_s: float


def sample_from_stats(record: dict[str, Any], at: float) -> StatsSample:
    """Read a ``getAllDomainStats`` record (state, cpu-total, block, interface groups)."""
    return StatsSample(
        at=at,
        cpu_ns=_int(record.get("cpu.time")),
        block_bytes=_sum(record, "block", ("rd.bytes", "wr.bytes")),
        net_bytes=_sum(record, "net", ("rx.bytes", "tx.bytes")),
    )


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _sum(record: dict[str, Any], group: str, fields: tuple[str, ...]) -> int | None:
    count = _int(record.get(f"{group}.count"))
    if count is None:
        return None
    total = 0
    for index in range(min(count, 1024)):
        for name in fields:
            value = _int(record.get(f"{group}.{index}.{name}"))
            if value is None:
                return None
            total += value
    return total


class RecentSamples:
    """The samples of one domain that cover the last ``duration_s`` (and one before)."""

    def __init__(self, duration_s: float) -> None:
        self.duration_s = duration_s
        self.samples: deque[StatsSample] = deque()

    def add(self, sample: StatsSample) -> None:
        """Append a sample (in time order) and drop those no longer needed."""
        self.samples.append(sample)
        cutoff = sample.at - self.duration_s
        # Keep the newest sample at or before the cutoff: it opens the span looked at.
        while len(self.samples) >= 2 and self.samples[1].at <= cutoff:
            self.samples.popleft()


def samples_busy_reason(recent: RecentSamples, limits: Thresholds) -> str | None:
    """Why the guest counts as busy over the samples, or None if it was idle throughout."""
    samples = list(recent.samples)
    if samples:
        # They may cover more than this policy asks for: look at the last duration_s only
        # (and the sample that opens it).
        cutoff = samples[-1].at - limits.duration_s
        first = max((i for i, s in enumerate(samples) if s.at <= cutoff), default=0)
        samples = samples[first:]
    if len(samples) < 2:
        return "not observed yet"
    observed = samples[-1].at - samples[0].at
    if observed < limits.duration_s:
        return f"observed for {observed:.0f} s of the {limits.duration_s:.0f} s required"
    for before, after in itertools.pairwise(samples):
        reason = _pair_reason(before, after, limits)
        if reason is not None:
            return reason
    return None


def _pair_reason(before: StatsSample, after: StatsSample, limits: Thresholds) -> str | None:
    elapsed = after.at - before.at
    if elapsed <= 0:
        return "samples out of order"
    # (name, first, second, rate of one counter unit per second, limit, unit)
    checks = (
        ("CPU", before.cpu_ns, after.cpu_ns, 100.0 / 1e9, limits.cpu_percent, "%"),
        ("disk", before.block_bytes, after.block_bytes, 1.0, limits.disk_bytes_per_s, "B/s"),
        ("network", before.net_bytes, after.net_bytes, 1.0, limits.net_bytes_per_s, "B/s"),
    )
    for name, first, second, scale, limit, unit in checks:
        if first is None or second is None:
            return f"{name} statistics unavailable"
        if second < first:
            return f"{name} counters went back (the guest restarted?)"
        rate = (second - first) * scale / elapsed
        if rate > limit:
            return f"{name} {rate:.1f} {unit} above {limit:g} {unit}"
    return None
