"""The metrics registry, built from the journal, what the daemon observed and the domains listed.

Nothing is written here: ``build_registry`` returns a registry, ``writer`` writes it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from virt_reclaim import __version__, backups
from virt_reclaim.domxml import read
from virt_reclaim.errors import QemuImgError
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.context import SHUTDOWN_REQUESTED
from virt_reclaim.job.results import Outcome
from virt_reclaim.journal.store import Journal
from virt_reclaim.metrics.observations import (
    DAEMON_START,
    DOMAIN_SKIPS,
    ESTIMATED_AT,
    LAST_SAMPLE,
    RECLAIMABLE,
    WINDOWS_OPENED,
    LastEstimate,
    Observations,
)
from virt_reclaim.model import DomainObservation, DomainState

# A disk's virtual size is read again after this long (or when its image file is replaced).
VIRTUAL_SIZE_TTL_S = 3600.0
# Journal marks that are points inside a step, not steps of their own.
STEP_MARKS = (SHUTDOWN_REQUESTED,)
OUTCOMES = tuple(str(o) for o in Outcome)
RUNNING_STATES = (DomainState.RUNNING, DomainState.BLOCKED)


class DiskSizes:
    """Each image's allocated bytes (always fresh) and virtual size (cached per image file)."""

    def __init__(self, qemu_img_path: str, ttl_s: float = VIRTUAL_SIZE_TTL_S) -> None:
        self.qemu_img = qemu_img_path
        self._tool = QemuImg(qemu_img_path)
        self.ttl_s = ttl_s
        self._virtual: dict[tuple[str, int, int], tuple[float, int | None]] = {}
        self._seen: set[tuple[str, int, int]] = set()

    def sizes_of(self, path: str, image_format: str) -> tuple[int | None, int | None]:
        """(allocated bytes, virtual bytes) of the image at ``path``; None for what is unknown.

        ``image_format`` is the definition's: a guest's bytes never choose it (no probe).
        """
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
                top = self._tool.info(path, backing_chain=False, force_share=True,
                                      image_format=image_format)[0]  # fmt: skip
                cached = (now, top.virtual_size)
            except QemuImgError:
                cached = (now, None)
            self._virtual[key] = cached
        return st.st_blocks * 512, cached[1]

    def forget_unseen(self) -> None:
        """Drop the cache of images not read since the last call (gone, or replaced)."""
        self._virtual = {k: v for k, v in self._virtual.items() if k in self._seen}
        self._seen = set()


class _Families(Collector):
    """The families of one write, for a registry of their own."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def build_registry(
    journal: Journal,
    observed: Observations,
    domains: Sequence[DomainObservation],
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
    families += _backup_families(journal)
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


def _domain_families(domains: Sequence[DomainObservation], sizes: DiskSizes) -> list[Metric]:
    running = _gauge("virt_reclaim_domain_running",
                     "1 when libvirt says the domain runs, else 0.", ["domain"])  # fmt: skip
    allocated = _gauge("virt_reclaim_disk_allocated_bytes",
                       "Bytes the disk's image file occupies on the host (st_blocks).",
                       ["domain", "target"])  # fmt: skip
    virtual = _gauge("virt_reclaim_disk_virtual_bytes", "Bytes the guest sees on the disk.",
                     ["domain", "target"])  # fmt: skip
    for domain in sorted(domains, key=lambda s: s.name):
        running.add_metric([domain.name], 1 if domain.state in RUNNING_STATES else 0)
        try:
            disks = read.parse_domain(domain.xml).disks
        except read.DomainXMLError:
            continue
        for disk in disks:
            if not disk.is_file_qcow2 or disk.source is None:
                continue
            used, size = sizes.sizes_of(disk.source, "qcow2")  # is_file_qcow2: the XML says so
            if used is not None:
                allocated.add_metric([domain.name, disk.target], used)
            if size is not None:
                virtual.add_metric([domain.name, disk.target], size)
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
        outcome.add_metric([job.domain, str(job.outcome or "")], 1)
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


def _should_run(
    journal: Journal, job_id: str, outcome: Outcome | None, previous: str | None
) -> int:
    """Whether the job should have left its guest running, by what the frame restores."""
    was_running = previous == str(DomainState.RUNNING)
    if outcome is not Outcome.RECLAIMED:
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
        key = (row.domain, row.target)
        found: list[LastEstimate] = []
        if row.estimated_at is not None:
            gain = max(0, (row.bytes_before or 0) - (row.estimated_after or 0))
            found.append(LastEstimate(gain, row.estimated_at))
        if row.reclaimed_at is not None:
            found.append(LastEstimate(0, row.reclaimed_at))
            reclaimed.add_metric(list(key), row.bytes_after or 0)
        if key in estimates:
            found.append(estimates[key])
        if found:
            estimates[key] = max(found, key=lambda e: e.at)
    for key, estimate in sorted(estimates.items()):
        reclaimable.add_metric(list(key), estimate.reclaimable)
        estimated_at.add_metric(list(key), estimate.at)
    return [reclaimable, estimated_at, reclaimed]


def _backup_families(journal: Journal) -> list[Metric]:
    held = _gauge(
        "virt_reclaim_backup_bytes", "Bytes held on the host by originals kept as backups "
        "(not reclaimed until they expire and are deleted).", ["domain"],
    )  # fmt: skip
    count = _gauge("virt_reclaim_backups", "Originals kept as backups.", ["domain"])
    by_domain: dict[str, list[int]] = {}
    for backup in journal.backups():
        figures = by_domain.setdefault(backup.domain, [0, 0])
        figures[0] += backups.held_bytes(backup) or 0
        figures[1] += 1
    for domain, (size, number) in sorted(by_domain.items()):
        held.add_metric([domain], size)
        count.add_metric([domain], number)
    return [held, count]
