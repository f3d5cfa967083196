"""What only the daemon sees of the metrics (``Observations``), and reading it back from the file.

The daemon counts these itself; ``read_previous`` finds them in a file written before,
so that a restart (or a ``run`` writing the same file) carries them over.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from prometheus_client.parser import text_string_to_metric_families

from virt_reclaim.job.results import JobResult, Outcome
from virt_reclaim.service import eligibility

log = structlog.get_logger("virt_reclaim.metrics")

# The families only the daemon knows (``run`` carries them over from the file).
WINDOWS_OPENED = "virt_reclaim_windows_opened"
DOMAIN_SKIPS = "virt_reclaim_domain_skips"
LAST_SAMPLE = "virt_reclaim_last_sample_timestamp_seconds"
DAEMON_START = "virt_reclaim_daemon_start_time_seconds"
RECLAIMABLE = "virt_reclaim_disk_reclaimable_bytes"
ESTIMATED_AT = "virt_reclaim_disk_estimate_timestamp_seconds"

# The label values of virt_reclaim_domain_skips_total{reason}: a reason's start (or words
# in it), in order; the dry run's outcome names the others.
_SKIP_KINDS = (
    (eligibility.BUSY, "busy"),
    ("reclaimed recently", "min-interval"),
    ("a job for it is running", "job-running"),
    ("the journal cannot be read", "journal"),
    (eligibility.GONE, "gone"),
)
_OUTCOME_KINDS = {
    Outcome.SKIPPED: "not-eligible",
    Outcome.NOTHING_TO_DO: "nothing-to-do",
    Outcome.FAILED: "estimate-failed",
}


def skip_kind(reason: str) -> str:
    """The label of a ``domain.skipped`` reason: busy, min-interval, does-not-fit, ..."""
    for start, kind in _SKIP_KINDS:
        if reason.startswith(start):
            return kind
    if "does not fit" in reason:
        return "does-not-fit"
    return "error"


@dataclass(frozen=True)
class LastEstimate:
    """A disk's reclaimable bytes as last estimated, and when (epoch seconds)."""

    reclaimable: int
    at: float


@dataclass
class Observations:
    """What the daemon sees that no journal keeps; any thread may report to it."""

    started_at: float | None = None
    last_sample_at: float | None = None
    windows: dict[str, float] = field(default_factory=dict)  # policy -> windows opened
    skips: dict[tuple[str, str], float] = field(default_factory=dict)  # (domain, reason)
    estimates: dict[tuple[str, str], LastEstimate] = field(default_factory=dict)  # (domain, target)
    # When each domain was last counted here (epoch seconds): its series go with it once
    # it is removed from libvirt and this is old enough (prune_removed_after).
    touched: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def window_opened(self, policy: str) -> None:
        """A policy's window opened."""
        with self._lock:
            self.windows[policy] = self.windows.get(policy, 0.0) + 1

    def skipped(self, domain: str, reason: str, kind: str | None = None) -> None:
        """A domain of an open window was skipped (``domain.skipped``), for ``reason``."""
        key = (domain, kind or skip_kind(reason))
        with self._lock:
            self.skips[key] = self.skips.get(key, 0.0) + 1
            self.touched[domain] = max(time.time(), self.touched.get(domain, 0.0))

    def estimated(self, domain: str, result: JobResult, at: float | None = None) -> None:
        """A dry run of ``domain`` ended: its disks' estimates; a skip unless it would reclaim."""
        if result.outcome is not Outcome.DRY_RUN:
            self.skipped(domain, result.reason, _OUTCOME_KINDS.get(result.outcome, "error"))
        when = time.time() if at is None else at
        with self._lock:
            for disk in result.disks:
                if disk.estimated_after is not None:
                    gain = max(0, disk.bytes_before - disk.estimated_after)
                    self.estimates[(domain, disk.target)] = LastEstimate(gain, when)
            self.touched[domain] = max(when, self.touched.get(domain, 0.0))

    def sampled(self, at: float) -> None:
        """A statistics sample of every domain succeeded at ``at`` (epoch seconds)."""
        with self._lock:
            self.last_sample_at = max(at, self.last_sample_at or 0.0)

    def carry(self, previous: Observations) -> None:
        """Add what a previous file counted; keep the newer estimates and sample time.

        The file holds no time for a skip: its domain counts as touched at the file's last
        sample (or now), so that a restart never shortens how long its series are kept.
        """
        skipped_at = previous.last_sample_at or time.time()
        with self._lock:
            for domain, _ in previous.skips:
                self.touched[domain] = max(skipped_at, self.touched.get(domain, 0.0))
            for (domain, _), estimate in previous.estimates.items():
                self.touched[domain] = max(estimate.at, self.touched.get(domain, 0.0))
            for policy, count in previous.windows.items():
                self.windows[policy] = self.windows.get(policy, 0.0) + count
            for key, count in previous.skips.items():
                self.skips[key] = self.skips.get(key, 0.0) + count
            for key, estimate in previous.estimates.items():
                mine = self.estimates.get(key)
                if mine is None or mine.at < estimate.at:
                    self.estimates[key] = estimate
            if previous.last_sample_at is not None:
                self.last_sample_at = max(previous.last_sample_at, self.last_sample_at or 0.0)

    def copy(self) -> Observations:
        """A copy to write from while the daemon goes on counting."""
        with self._lock:
            return Observations(
                started_at=self.started_at,
                last_sample_at=self.last_sample_at,
                windows=dict(self.windows),
                skips=dict(self.skips),
                estimates=dict(self.estimates),
                touched=dict(self.touched),
            )

    def forget(self, domains: Collection[str]) -> None:
        """Drop every series of these domains (removed from libvirt long enough ago)."""
        with self._lock:
            self.skips = {k: v for k, v in self.skips.items() if k[0] not in domains}
            self.estimates = {k: v for k, v in self.estimates.items() if k[0] not in domains}
            self.touched = {k: v for k, v in self.touched.items() if k not in domains}


def read_previous(path: str) -> Observations:
    """What a metrics file written before holds of the daemon's own figures (nothing if none).

    ``started_at`` is kept too: ``run`` writes the daemon's start time as it found it.
    """
    found = Observations()
    try:
        text = Path(path).read_text(encoding="utf-8")
        families = list(text_string_to_metric_families(text))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("metrics.unreadable", path=path, error=str(exc))
        return found
    reclaimable: dict[tuple[str, str], float] = {}
    estimated_at: dict[tuple[str, str], float] = {}
    for family in families:
        for sample in family.samples:
            labels, value = sample.labels, sample.value
            if family.name == WINDOWS_OPENED and "policy" in labels:
                found.windows[labels["policy"]] = value
            elif family.name == DOMAIN_SKIPS and {"domain", "reason"} <= labels.keys():
                found.skips[(labels["domain"], labels["reason"])] = value
            elif family.name == LAST_SAMPLE and value > 0:
                found.last_sample_at = value
            elif family.name == DAEMON_START:
                found.started_at = value
            elif (
                family.name in (RECLAIMABLE, ESTIMATED_AT) and {"domain", "target"} <= labels.keys()
            ):
                into = reclaimable if family.name == RECLAIMABLE else estimated_at
                into[(labels["domain"], labels["target"])] = value
    for key, value in reclaimable.items():
        if key in estimated_at:
            found.estimates[key] = LastEstimate(int(value), estimated_at[key])
    return found
