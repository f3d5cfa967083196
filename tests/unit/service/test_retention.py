"""Removed domains forgotten after prune_removed_after: journal jobs and metric series, not backups.

A real journal file, libvirt's test driver for the domain list (its one domain is "test").
"""

from __future__ import annotations

import signal
import sqlite3
import time
from datetime import timedelta
from pathlib import Path

import pytest

from testbed.daemon import DaemonProcess, write_config
from virt_reclaim.config.loading import DaemonConfig
from virt_reclaim.job.results import Outcome
from virt_reclaim.job.settings import JobSettings
from virt_reclaim.journal.records import BackupRecord, DomainActivity, JournalDisk
from virt_reclaim.journal.store import Journal
from virt_reclaim.metrics.observations import LastEstimate, Observations
from virt_reclaim.model import DomainObservation
from virt_reclaim.service import retention
from virt_reclaim.virt.connection import Hypervisor

DAY = 86400.0
NOW = time.time()


@pytest.fixture(scope="module")
def present() -> list[DomainObservation]:
    with Hypervisor("test:///default", read_only=True) as hypervisor:
        return hypervisor.domains()


def add_job(
    journal: Journal, job_id: str, domain: str, uuid: str, age_s: float, *, finished: bool = True
) -> None:
    """A job of ``domain`` that started and ended ``age_s`` ago, with a disk and a step."""
    journal.begin_job(job_id, domain, uuid, JobSettings())
    journal.record_for_recovery(job_id, "running", [JournalDisk("vda", f"/i/{job_id}", "/t", None)])
    journal.enter_step(job_id, "inspect")
    if finished:
        journal.finish_job(job_id, outcome=Outcome.RECLAIMED, reason="", bytes_before=2,
                           bytes_after=1, downtime_s=1.0, duration_s=2.0)  # fmt: skip
    with sqlite3.connect(journal.path) as db:  # backdated: the journal writes time.time()
        db.execute(
            "UPDATE jobs SET started_at = ?, finished_at = CASE WHEN finished_at IS NULL "
            "THEN NULL ELSE ? END WHERE id = ?",
            (NOW - age_s, NOW - age_s, job_id),
        )


def jobs_of(journal: Journal) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for job in journal.history(limit=100):
        found.setdefault(job.domain, []).append(job.id)
    return {name: sorted(ids) for name, ids in found.items()}


def test_only_domains_gone_from_libvirt_and_quiet_long_enough_are_chosen(
    present: list[DomainObservation],
) -> None:
    [test] = present
    activity = [
        DomainActivity("test", frozenset({test.uuid}), NOW - 90 * DAY, unfinished=False),
        DomainActivity("renamed", frozenset({test.uuid}), NOW - 90 * DAY, unfinished=False),
        DomainActivity("old", frozenset({"u-old"}), NOW - 40 * DAY, unfinished=False),
        DomainActivity("recent", frozenset({"u-recent"}), NOW - 2 * DAY, unfinished=False),
        DomainActivity("interrupted", frozenset({"u-int"}), NOW - 90 * DAY, unfinished=True),
        DomainActivity("skipped-lately", frozenset({"u-sk"}), NOW - 90 * DAY, unfinished=False),
    ]
    touched = {"skipped-lately": NOW - DAY, "metrics-only-old": NOW - 31 * DAY,
               "metrics-only-new": NOW - DAY}  # fmt: skip
    chosen = retention.removed_before(activity, touched, present, NOW - 30 * DAY)
    assert chosen == {"old", "metrics-only-old"}


def test_a_pass_drops_old_jobs_and_series_and_keeps_backups(
    tmp_path: Path, present: list[DomainObservation]
) -> None:
    [test] = present
    journal = Journal(tmp_path / "state")
    add_job(journal, "j-test", "test", test.uuid, 90 * DAY)
    add_job(journal, "j-old-1", "old", "u-old", 60 * DAY)
    add_job(journal, "j-old-2", "old", "u-old", 40 * DAY)
    add_job(journal, "j-recent", "recent", "u-recent", 5 * DAY)
    add_job(journal, "j-int", "interrupted", "u-int", 90 * DAY, finished=False)
    add_job(journal, "j-backup", "with-backup", "u-b", 60 * DAY)
    add_job(journal, "j-nobackup", "with-backup", "u-b", 50 * DAY)
    backup = BackupRecord(path="/i/kept", job_id="j-backup", domain="with-backup", target="vda",
                          device=1, inode=2, bytes=3, created_at=NOW - 60 * DAY,
                          expires_at=NOW + 300 * DAY)  # fmt: skip
    journal.record_backup(backup)
    observations = Observations()
    observations.skipped("old", "busy")
    observations.estimates[("old", "vda")] = LastEstimate(5, NOW - 45 * DAY)
    observations.skipped("recent", "busy")
    observations.touched["old"] = NOW - 45 * DAY  # counted long ago
    config = DaemonConfig(state_dir=str(tmp_path / "state"),
                          prune_removed_after=timedelta(days=30))  # fmt: skip

    forgotten = retention.forget_removed(config, observations, present, now=NOW)

    assert forgotten == retention.Forgotten(("old", "with-backup"), jobs=3)
    assert jobs_of(journal) == {
        "test": ["j-test"], "recent": ["j-recent"], "interrupted": ["j-int"],
        "with-backup": ["j-backup"],  # its backup is still kept: the job behind it stays
    }  # fmt: skip
    assert journal.backups() == [backup]
    assert journal.unfinished()[0].id == "j-int"
    assert {domain for domain, _kind in observations.skips} == {"recent"}
    assert observations.estimates == {} and "old" not in observations.touched
    with sqlite3.connect(journal.path) as db:  # no disk or step row left behind
        assert (
            db.execute("SELECT job_id FROM job_disks WHERE job_id LIKE 'j-old%'").fetchall() == []
        )
        assert db.execute("SELECT job_id FROM steps WHERE job_id LIKE 'j-old%'").fetchall() == []
    # A second pass finds nothing more to do.
    assert retention.forget_removed(config, observations, present, now=NOW) is None


def test_the_daemon_forgets_removed_domains_at_its_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = Journal(state)
    add_job(journal, "j-old", "old", "u-old", 40 * DAY)
    add_job(journal, "j-recent", "recent", "u-recent", 10 * DAY)
    metrics = tmp_path / "metrics" / "virt_reclaim.prom"
    metrics.parent.mkdir()
    config_dir = write_config(
        tmp_path / "etc",
        f'uri = "test:///default"\nstate_dir = "{state}"\nlog_format = "json"\n'
        f'prune_removed_after = "20d"\nmetrics_file = "{metrics}"\n',
        {},
    )
    daemon = DaemonProcess(config_dir)
    try:
        forgotten = daemon.wait_event("domains.forgotten", 60)
        daemon.wait_event("daemon.started", 60)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(60) == 0, daemon.tail()
    finally:
        daemon.stop()

    assert forgotten["domains"] == ["old"] and forgotten["jobs"] == 1
    assert forgotten["older_than_s"] == 20 * DAY
    assert jobs_of(journal) == {"recent": ["j-recent"]}
    text = metrics.read_text()
    assert 'domain="recent"' in text and 'domain="old"' not in text
