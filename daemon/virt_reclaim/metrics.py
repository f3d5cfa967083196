"""Metrics for node_exporter's textfile collector: what the daemon and ``run`` did, as numbers.

The file is built with prometheus_client (a registry of metric families, written by
``write_to_textfile``: a temporary file renamed over the old one) from three sources:

- the journal: jobs by outcome, bytes reclaimed, downtime, each domain's last job,
  step durations, each disk's newest estimate and reclaim. These counters are counted
  again from the journal at every write, so they survive restarts;
- the domains libvirt lists: each qcow2 disk's allocated bytes (``st_blocks``) and
  virtual size (``qemu-img info -U``, cached per image file), whether the domain runs;
- what only the daemon sees (``Observations``): windows opened, domains skipped by
  reason, the estimates of its dry runs, its last libvirt sample. The daemon counts
  these itself and adds the counts of the previous file at its start, so that a
  restart does not reset them; ``virt-reclaim run``, which writes the same file,
  carries them over as it finds them.

The daemon writes on its own thread (``DaemonMetrics``): a request only hands over
what to write, and requests made while a write is under way are written once after it.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from virt_reclaim import __version__, domxml, qemu_img, windows
from virt_reclaim.config import DaemonConfig
from virt_reclaim.errors import QemuImgError, VirtError
from virt_reclaim.jobcontext import SHUTDOWN_REQUESTED
from virt_reclaim.journal import Journal, JournalError
from virt_reclaim.model import DomainSnapshot, DomainState
from virt_reclaim.results import JobResult, Outcome

log = structlog.get_logger("virt_reclaim.metrics")

# node_exporter runs as its own user: the file must be readable by others, whatever the
# daemon's umask (the unit's is 0077).
FILE_MODE = 0o644
# While it samples, the daemon writes the file at least this often (the sample's time is in it).
REFRESH_S = 60.0
# A disk's virtual size is read again after this long (or when its image file is replaced).
VIRTUAL_SIZE_TTL_S = 3600.0
# Journal marks that are points inside a step, not steps of their own.
STEP_MARKS = (SHUTDOWN_REQUESTED,)
OUTCOMES = tuple(str(o) for o in Outcome)
RUNNING_STATES = (DomainState.RUNNING, DomainState.BLOCKED)

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
    (windows.BUSY, "busy"),
    ("reclaimed recently", "min-interval"),
    ("a job for it is running", "job-running"),
    ("the journal cannot be read", "journal"),
    (windows.GONE, "gone"),
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
class Estimate:
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
    estimates: dict[tuple[str, str], Estimate] = field(default_factory=dict)  # (domain, target)
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

    def estimated(self, domain: str, result: JobResult, at: float | None = None) -> None:
        """A dry run of ``domain`` ended: its disks' estimates; a skip unless it would reclaim."""
        if result.outcome is not Outcome.DRY_RUN:
            self.skipped(domain, result.reason, _OUTCOME_KINDS.get(result.outcome, "error"))
        when = time.time() if at is None else at
        with self._lock:
            for disk in result.disks:
                if disk.estimated_after is not None:
                    gain = max(0, disk.bytes_before - disk.estimated_after)
                    self.estimates[(domain, disk.target)] = Estimate(gain, when)

    def sampled(self, at: float) -> None:
        """A statistics sample of every domain succeeded at ``at`` (epoch seconds)."""
        with self._lock:
            self.last_sample_at = max(at, self.last_sample_at or 0.0)

    def carry(self, previous: Observations) -> None:
        """Add what a previous file counted; keep the newer estimates and sample time."""
        with self._lock:
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
            )


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
            found.estimates[key] = Estimate(int(value), estimated_at[key])
    return found


class DiskSizes:
    """Each image's allocated bytes (always fresh) and virtual size (cached per image file)."""

    def __init__(self, qemu_img_path: str, ttl_s: float = VIRTUAL_SIZE_TTL_S) -> None:
        self.qemu_img = qemu_img_path
        self.ttl_s = ttl_s
        self._virtual: dict[tuple[str, int, int], tuple[float, int | None]] = {}
        self._seen: set[tuple[str, int, int]] = set()

    def measure(self, path: str) -> tuple[int | None, int | None]:
        """(allocated bytes, virtual bytes) of the image at ``path``; None for what is unknown."""
        try:
            st = os.stat(path)
        except OSError:
            return None, None
        key = (path, st.st_dev, st.st_ino)  # a swap renames a new file over the old one
        self._seen.add(key)
        now = time.monotonic()
        cached = self._virtual.get(key)
        if cached is None or now - cached[0] > self.ttl_s:
            try:
                top = qemu_img.info(path, qemu_img=self.qemu_img, backing_chain=False,
                                    force_share=True)[0]  # fmt: skip
                cached = (now, top.virtual_size)
            except QemuImgError:
                cached = (now, None)
            self._virtual[key] = cached
        return st.st_blocks * 512, cached[1]

    def forget_unseen(self) -> None:
        """Drop the cache of images not measured since the last call (gone, or replaced)."""
        self._virtual = {k: v for k, v in self._virtual.items() if k in self._seen}
        self._seen = set()


class _Families(Collector):
    """The families of one write, for a registry of their own."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def build(
    journal: Journal,
    observed: Observations,
    domains: Sequence[DomainSnapshot],
    sizes: DiskSizes,
) -> CollectorRegistry:
    """Every metric family, from the journal, what was observed and the domains listed.

    Raises:
        JournalError: The journal cannot be read.
    """
    families: list[Metric] = []
    info = GaugeMetricFamily(
        "virt_reclaim_build_info", "The virt-reclaim that wrote this file (always 1).",
        labels=["version"],
    )  # fmt: skip
    info.add_metric([__version__], 1)
    families.append(info)
    families += _daemon_families(observed)
    names = {d.name for d in domains}
    families += _domain_families(domains, sizes)
    families += _job_families(journal, names)
    families += _disk_figures(journal, observed)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return registry


def _gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


def _daemon_families(observed: Observations) -> list[Metric]:
    families: list[Metric] = []
    if observed.started_at is not None:
        started = _gauge(DAEMON_START, "When the daemon that wrote this started (epoch seconds).")
        started.add_metric([], observed.started_at)
        families.append(started)
        # 0 when it never sampled: "no sample for 15 minutes" holds from its start.
        sample = _gauge(LAST_SAMPLE, "When the daemon's last libvirt statistics sample of every "
                        "domain succeeded (epoch seconds; 0: none yet).")  # fmt: skip
        sample.add_metric([], observed.last_sample_at or 0.0)
        families.append(sample)
    elif observed.last_sample_at is not None:
        sample = _gauge(LAST_SAMPLE, "When the daemon's last libvirt statistics sample of every "
                        "domain succeeded (epoch seconds; 0: none yet).")  # fmt: skip
        sample.add_metric([], observed.last_sample_at)
        families.append(sample)
    opened = CounterMetricFamily(
        WINDOWS_OPENED, "Windows opened, by policy (counted by the daemon, kept across its "
        "restarts through this file).", labels=["policy"],
    )  # fmt: skip
    for policy, count in sorted(observed.windows.items()):
        opened.add_metric([policy], count)
    skips = CounterMetricFamily(
        DOMAIN_SKIPS, "Domains of an open window not reclaimed (domain.skipped), by reason: "
        "busy, min-interval, job-running, does-not-fit, not-eligible, nothing-to-do, "
        "estimate-failed, journal, gone, error.", labels=["domain", "reason"],
    )  # fmt: skip
    for (domain, reason), count in sorted(observed.skips.items()):
        skips.add_metric([domain, reason], count)
    return [*families, opened, skips]


def _domain_families(domains: Sequence[DomainSnapshot], sizes: DiskSizes) -> list[Metric]:
    running = _gauge("virt_reclaim_domain_running",
                     "1 when libvirt says the domain runs, else 0.", ["domain"])  # fmt: skip
    allocated = _gauge("virt_reclaim_disk_allocated_bytes",
                       "Bytes the disk's image file occupies on the host (st_blocks).",
                       ["domain", "target"])  # fmt: skip
    virtual = _gauge("virt_reclaim_disk_virtual_bytes", "Bytes the guest sees on the disk.",
                     ["domain", "target"])  # fmt: skip
    for snap in sorted(domains, key=lambda s: s.name):
        running.add_metric([snap.name], 1 if snap.state in RUNNING_STATES else 0)
        try:
            disks = domxml.parse_domain(snap.xml).disks
        except domxml.DomainXMLError:
            continue
        for disk in disks:
            if not disk.is_file_qcow2 or disk.source is None:
                continue
            used, size = sizes.measure(disk.source)
            if used is not None:
                allocated.add_metric([snap.name, disk.target], used)
            if size is not None:
                virtual.add_metric([snap.name, disk.target], size)
    sizes.forget_unseen()
    return [running, allocated, virtual]


def _job_families(journal: Journal, domains: Iterable[str]) -> list[Metric]:
    totals = journal.outcome_totals()
    jobs = CounterMetricFamily(
        "virt_reclaim_jobs", "Finished jobs by outcome (from the journal; dry runs of "
        "'run --dry-run' count as dry-run).", labels=["domain", "outcome"],
    )  # fmt: skip
    reclaimed = CounterMetricFamily(
        "virt_reclaim_reclaimed_bytes", "Bytes freed on the host by reclaims (before - after).",
        labels=["domain"],
    )  # fmt: skip
    downtime = CounterMetricFamily(
        "virt_reclaim_downtime_seconds", "Seconds the domain's guest was down for its jobs.",
        labels=["domain"],
    )  # fmt: skip
    counts: dict[tuple[str, str], int] = {}
    freed: dict[str, int] = {}
    down: dict[str, float] = {}
    for domain, outcome, count, gain, seconds in totals:
        counts[(domain, outcome)] = count
        freed[domain] = freed.get(domain, 0) + gain
        down[domain] = down.get(domain, 0.0) + seconds
    # Every outcome of every known domain, 0 when none: the first failure is an increase.
    for domain in sorted(set(domains) | set(freed)):
        for outcome in OUTCOMES:
            jobs.add_metric([domain, outcome], counts.get((domain, outcome), 0))
        reclaimed.add_metric([domain], freed.get(domain, 0))
        downtime.add_metric([domain], down.get(domain, 0.0))
    return [jobs, reclaimed, downtime, *_last_job_families(journal)]


def _last_job_families(journal: Journal) -> list[Metric]:
    at = _gauge(
        "virt_reclaim_last_job_timestamp_seconds",
        "When the domain's last job (not a dry run) ended (epoch seconds).",
        ["domain"],
    )
    duration = _gauge(
        "virt_reclaim_last_job_duration_seconds", "How long the domain's last job took.", ["domain"]
    )
    downtime = _gauge(
        "virt_reclaim_last_job_downtime_seconds",
        "How long the domain's last job kept its guest down.",
        ["domain"],
    )
    outcome = _gauge(
        "virt_reclaim_last_job_outcome",
        "1 for the outcome of the domain's last job.",
        ["domain", "outcome"],
    )
    should_run = _gauge(
        "virt_reclaim_last_job_guest_should_run",
        "1 when the domain's last job should have left its guest running (it ran before and "
        "the job restores that, or the policy says after = start), else 0.",
        ["domain"],
    )
    steps = SummaryMetricFamily(
        "virt_reclaim_step_duration_seconds",
        "Seconds the steps of the finished jobs took, by step (from the journal: a step "
        "lasts until the next one starts, the last one until the job ends).",
        labels=["step"],
    )
    last_steps = _gauge(
        "virt_reclaim_last_job_step_duration_seconds",
        "Seconds each step of the domain's last job took.",
        ["domain", "step"],
    )
    last = journal.last_jobs()
    last_ids = {job.id: job.domain for job in last}
    for job in last:
        assert job.finished_at is not None  # noqa: S101 - last_jobs returns finished jobs
        at.add_metric([job.domain], job.finished_at)
        duration.add_metric([job.domain], job.duration_s or 0.0)
        downtime.add_metric([job.domain], job.downtime_s or 0.0)
        outcome.add_metric([job.domain, job.outcome or ""], 1)
        should_run.add_metric([job.domain], _should_run(journal, job.id, job.outcome,
                                                        job.previous_state))  # fmt: skip
    per_step: dict[str, tuple[int, float]] = {}
    per_last: dict[tuple[str, str], float] = {}
    for job_id, step, seconds in journal.step_durations(STEP_MARKS):
        count, total = per_step.get(step, (0, 0.0))
        per_step[step] = (count + 1, total + seconds)
        if job_id in last_ids:
            key = (last_ids[job_id], step)
            per_last[key] = per_last.get(key, 0.0) + seconds
    for step, (count, total) in sorted(per_step.items()):
        steps.add_metric([step], count_value=count, sum_value=total)
    for (domain, step), seconds in sorted(per_last.items()):
        last_steps.add_metric([domain, step], seconds)
    return [at, duration, downtime, outcome, should_run, steps, last_steps]


def _should_run(journal: Journal, job_id: str, outcome: str | None, previous: str | None) -> int:
    """Whether the job should have left its guest running, by what the frame restores."""
    was_running = previous == str(DomainState.RUNNING)
    if outcome != str(Outcome.RECLAIMED):
        return int(was_running)  # nothing changed, or the previous state restored
    after = journal.job_setting(job_id, "after")
    if after == "start":
        return 1
    if after == "off":
        return 0
    return int(was_running)


def _disk_figures(journal: Journal, observed: Observations) -> list[Metric]:
    reclaimable = _gauge(
        RECLAIMABLE, "The disk's reclaimable bytes as last estimated (a job's or the daemon's "
        "dry run; 0 once a reclaim rewrote it).", ["domain", "target"],
    )  # fmt: skip
    estimated_at = _gauge(ESTIMATED_AT, "When that estimate was made (epoch seconds).",
                          ["domain", "target"])  # fmt: skip
    reclaimed = _gauge("virt_reclaim_disk_last_reclaimed_bytes",
                       "Bytes the disk's image occupied right after its last reclaim.",
                       ["domain", "target"])  # fmt: skip
    estimates = dict(observed.estimates)
    for row in journal.disk_figures():
        key = (row["domain"], row["target"])
        found: list[Estimate] = []
        if row["estimated_at"] is not None:
            gain = max(0, row["bytes_before"] - row["estimated_after"])
            found.append(Estimate(gain, row["estimated_at"]))
        if row["reclaimed_at"] is not None:
            found.append(Estimate(0, row["reclaimed_at"]))
            reclaimed.add_metric(list(key), row["bytes_after"])
        if key in estimates:
            found.append(estimates[key])
        if found:
            estimates[key] = max(found, key=lambda e: e.at)
    for key, estimate in sorted(estimates.items()):
        reclaimable.add_metric(list(key), estimate.reclaimable)
        estimated_at.add_metric(list(key), estimate.at)
    return [reclaimable, estimated_at, reclaimed]


def write(path: str, registry: CollectorRegistry) -> None:
    """Write the registry to ``path`` atomically, readable by node_exporter.

    ``write_to_textfile`` writes a temporary file and renames it; its result is given
    its mode under a name node_exporter ignores (it reads ``*.prom`` only), then renamed
    to ``path``, so that the file is never seen unreadable or half written.
    """
    staging = f"{path}.{os.getpid()}.{threading.get_ident()}.staging"
    try:
        write_to_textfile(staging, registry)
        os.chmod(staging, FILE_MODE)
        os.rename(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def write_for_run(
    path: str,
    journal: Journal,
    list_domains: Callable[[], Sequence[DomainSnapshot]],
    qemu_img_path: str,
) -> bool:
    """``virt-reclaim run``: write the file, the daemon's figures carried over from it.

    Returns False (after a warning) when it could not be written; the job's outcome stands.
    """
    try:
        domains = list_domains()
        registry = build(journal, read_previous(path), domains, DiskSizes(qemu_img_path))
        write(path, registry)
    except (OSError, JournalError, VirtError) as exc:
        log.warning("metrics.write_failed", path=path, error=str(exc))
        return False
    return True


@dataclass(frozen=True)
class _Request:
    path: str
    state_dir: str
    qemu_img: str
    domains: tuple[DomainSnapshot, ...]


class DaemonMetrics:
    """The daemon's metrics file: what it observes, and the thread that writes the file."""

    def __init__(self) -> None:
        self.observations = Observations(started_at=time.time())
        self._lock = threading.Lock()
        self._pending: _Request | None = None
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._last_request = -math.inf
        self._sample_requested = False  # the first sample is written at once
        self._carried = False
        self._sizes: DiskSizes | None = None
        self._journal: Journal | None = None
        self._failing = False

    def request(
        self,
        settings: DaemonConfig,
        domains: Iterable[DomainSnapshot],
        *,
        sampled_at: float | None = None,
        periodic: bool = False,
    ) -> None:
        """Have the file written soon with these domains (nothing when no file is configured).

        ``periodic``: only if the last request is REFRESH_S old (after a sample).
        """
        if sampled_at is not None:
            self.observations.sampled(sampled_at)
        if not settings.metrics_file or self._closing:
            return
        now = time.monotonic()
        first_sample = sampled_at is not None and not self._sample_requested
        if periodic and now - self._last_request < REFRESH_S and not first_sample:
            return
        self._last_request = now
        self._sample_requested = self._sample_requested or sampled_at is not None
        request = _Request(settings.metrics_file, settings.state_dir, settings.qemu_img,
                           tuple(domains))  # fmt: skip
        with self._lock:
            self._pending = request
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="metrics", daemon=True)
                self._thread.start()
        self._wake.set()

    def close(self, timeout: float = 30.0) -> None:
        """Write what is pending, then end the thread (waiting at most ``timeout``)."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                request, self._pending = self._pending, None
            if request is not None:
                self._write(request)
            if self._closing and self._pending is None:
                if self._journal is not None:
                    self._journal.close()
                return

    def _write(self, request: _Request) -> None:
        try:
            if not self._carried:
                self._carried = True
                self.observations.carry(read_previous(request.path))
            if self._sizes is None or self._sizes.qemu_img != request.qemu_img:
                self._sizes = DiskSizes(request.qemu_img)
            if self._journal is None or self._journal.path.parent != Path(request.state_dir):
                self._journal = Journal(request.state_dir)
            registry = build(self._journal, self.observations.copy(), request.domains,
                             self._sizes)  # fmt: skip
            write(request.path, registry)
        except (OSError, JournalError) as exc:
            if not self._failing:  # once until it works again
                log.warning("metrics.write_failed", path=request.path, error=str(exc))
            self._failing = True
            return
        except Exception:  # a bug here must not stop the metrics for good
            log.exception("metrics.write_failed", path=request.path)
            self._failing = True
            return
        if self._failing:
            log.info("metrics.written", path=request.path)
        self._failing = False
