"""Forgetting removed domains: their journal records and metric series, after prune_removed_after.

A domain deleted from libvirt would otherwise keep its jobs in the journal and its series in
the metrics file for ever. The daemon, at its start and then daily, drops those of every
domain that libvirt no longer lists (by name or uuid) and whose newest record is older than
``prune_removed_after``. Kept backups are never touched: the job behind one stays until the
backup is deleted at its expiry, and goes at a later pass. An unfinished job stays too:
recovery may need it.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import structlog

from virt_reclaim.config.loading import DaemonConfig
from virt_reclaim.journal.records import DomainActivity, JournalError
from virt_reclaim.journal.store import Journal
from virt_reclaim.metrics.observations import Observations
from virt_reclaim.model import DomainObservation

log = structlog.get_logger("virt_reclaim.service")

# The daemon forgets removed domains this often (and at its start, once libvirt answered).
INTERVAL_S = 86400.0


@dataclass(frozen=True)
class Forgotten:
    """What a pass dropped: the domains (by name) and how many of their jobs."""

    domains: tuple[str, ...]
    jobs: int


def removed_before(
    activity: Iterable[DomainActivity],
    touched: dict[str, float],
    present: Collection[DomainObservation],
    before: float,
) -> set[str]:
    """The names of domains libvirt no longer lists whose newest record is older than ``before``.

    ``activity`` is the journal's, ``touched`` when the metrics last counted each domain.
    A name or a uuid libvirt lists keeps the domain; so does an unfinished job.
    """
    names = {domain.name for domain in present}
    uuids = {domain.uuid for domain in present}
    last = dict(touched)
    kept = set(names)
    for domain in activity:
        if domain.unfinished or domain.uuids & uuids:
            kept.add(domain.name)
        last[domain.name] = max(domain.last_at, last.get(domain.name, 0.0))
    return {name for name, at in last.items() if at < before and name not in kept}


def forget_removed(
    daemon_config: DaemonConfig,
    observations: Observations,
    present: Collection[DomainObservation],
    now: float | None = None,
) -> Forgotten | None:
    """Drop the journal records and metric series of domains removed long enough ago.

    ``present`` must be libvirt's full list, read just now: a partial one would forget
    domains that exist. Returns what went, or None when nothing did. A journal error is
    logged (``domains.forget_failed``), not raised: the next pass tries again.
    """
    now = time.time() if now is None else now
    keep_s = daemon_config.prune_removed_after.total_seconds()
    touched = observations.copy().touched
    try:
        journal = Journal(daemon_config.state_dir)
        try:
            names = removed_before(journal.domain_activity(), touched, present, now - keep_s)
            jobs = journal.forget_domains(names)
        finally:
            journal.close()
    except (JournalError, OSError) as exc:
        log.error("domains.forget_failed", error=str(exc))
        return None
    observations.forget(names)
    # A domain whose only jobs are behind kept backups lost nothing: not reported each day.
    gone = sorted(set(jobs) | (names & touched.keys()))
    if not gone:
        return None
    forgotten = Forgotten(tuple(gone), sum(jobs.values()))
    log.info("domains.forgotten", domains=gone, jobs=forgotten.jobs, older_than_s=keep_s)
    return forgotten
