"""The journal's read side over a real database filled here, on a clock the test sets.

Each query's answer is checked against the jobs written: their order, the ones left out
(unfinished, dry runs, other domains, a backup still held), and the figures computed.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from virt_reclaim.job.results import Outcome
from virt_reclaim.job.settings import Compression, JobSettings
from virt_reclaim.journal import store
from virt_reclaim.journal.records import BackupRecord, DiskFigures, DomainActivity, JournalDisk
from virt_reclaim.journal.store import Journal

MIB = 1024 * 1024


class Clock:
    """The journal's time.time(), moved by the test."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(store, "time", types.SimpleNamespace(time=clock.time))
    return clock


@pytest.fixture
def journal(tmp_path: Path, clock: Clock) -> Iterator[Journal]:
    opened = Journal(tmp_path / "state")
    yield opened
    opened.close()


def job(
    journal: Journal,
    clock: Clock,
    job_id: str,
    domain: str,
    *,
    outcome: Outcome | None = Outcome.RECLAIMED,
    steps: tuple[tuple[str, float], ...] = (),
    disks: tuple[JournalDisk, ...] = (),
    compression: Compression = Compression.ZSTD,
    before_after: tuple[int, int] | None = None,
    downtime_s: float | None = None,
) -> None:
    """A job of ``domain`` (uuid ``<domain>-uuid``) started now, ended after its steps.

    Each step takes the seconds given; ``outcome`` None leaves the job unfinished.
    """
    journal.begin_job(job_id, domain, f"{domain}-uuid", JobSettings(compression=compression))
    journal.record_for_recovery(job_id, "running", list(disks))
    for disk in disks:
        journal.record_disk(
            job_id, disk.target, bytes_before=disk.bytes_before, bytes_after=disk.bytes_after,
            estimated_after=disk.estimated_after, guest_used=disk.guest_used,
        )  # fmt: skip
    for step, seconds in steps:
        journal.enter_step(job_id, step)
        clock.now += seconds
    if outcome is not None:
        before, after = before_after or (None, None)
        journal.finish_job(
            job_id, outcome=outcome, reason="", bytes_before=before, bytes_after=after,
            downtime_s=downtime_s, duration_s=None,
        )  # fmt: skip
    clock.now += 100


def disk(target: str, before: int, after: int | None, estimated: int, used: int) -> JournalDisk:
    return JournalDisk(target, f"/images/{target}.qcow2", f"/images/{target}.new", None,
                       bytes_before=before, bytes_after=after, estimated_after=estimated,
                       guest_used=used)  # fmt: skip


def test_unfinished_jobs_oldest_first_of_all_domains_or_one(journal: Journal, clock: Clock) -> None:
    job(journal, clock, "a1", "a", outcome=None)
    job(journal, clock, "b1", "b")
    job(journal, clock, "b2", "b", outcome=None)
    assert [j.id for j in journal.unfinished()] == ["a1", "b2"]
    assert [j.id for j in journal.unfinished("b-uuid")] == ["b2"]
    assert journal.unfinished("c-uuid") == []


def test_history_newest_first_by_domain_time_outcome_and_limit(
    journal: Journal, clock: Clock
) -> None:
    job(journal, clock, "a1", "a", outcome=Outcome.FAILED)
    start_of_a2 = clock.now
    job(journal, clock, "a2", "a")
    job(journal, clock, "b1", "b", outcome=Outcome.DRY_RUN)
    job(journal, clock, "a3", "a", outcome=None)
    assert [j.id for j in journal.history()] == ["a3", "b1", "a2", "a1"]
    assert [j.id for j in journal.history("a")] == ["a3", "a2", "a1"]
    assert [j.id for j in journal.history(since=start_of_a2)] == ["a3", "b1", "a2"]
    assert [j.id for j in journal.history(outcomes={"failed", "unfinished"})] == ["a3", "a1"]
    assert [j.id for j in journal.history(outcomes={"unfinished"})] == ["a3"]
    assert [j.id for j in journal.history(outcomes={"reclaimed", "dry-run"})] == ["b1", "a2"]
    assert [j.id for j in journal.history(limit=2)] == ["a3", "b1"]
    assert [j.id for j in journal.history("a", outcomes={"dry-run"})] == []


def test_a_job_read_back_has_its_disks_steps_and_figures(journal: Journal, clock: Clock) -> None:
    job(journal, clock, "a1", "a", steps=(("inspect", 1), ("rewrite", 2)),
        disks=(disk("vdb", 300, 100, 120, 90), disk("vda", 200, 50, 60, 40)),
        before_after=(500, 150), downtime_s=4.0)  # fmt: skip
    [read] = journal.history()
    assert [d.target for d in read.disks] == ["vda", "vdb"]
    assert read.disks[0] == disk("vda", 200, 50, 60, 40)
    assert read.steps == ("inspect", "rewrite")
    assert (read.step, read.outcome, read.bytes_before, read.bytes_after) == (
        "rewrite", "reclaimed", 500, 150,
    )  # fmt: skip
    assert (read.previous_state, read.downtime_s, read.started_at) == ("running", 4.0, 1_000_000.0)


def test_domain_activity_names_each_domain_once_with_its_newest_record(
    journal: Journal, clock: Clock
) -> None:
    job(journal, clock, "a1", "a", steps=(("inspect", 5),))
    job(journal, clock, "b1", "b", outcome=None)
    journal.begin_job("a2", "a", "a-other-uuid", JobSettings())  # the same name, redefined
    assert journal.domain_activity() == [
        DomainActivity("a", frozenset({"a-uuid", "a-other-uuid"}), clock.now, True),
        DomainActivity("b", frozenset({"b-uuid"}), 1_000_105.0, True),
    ]


def test_reservations_of_other_unfinished_jobs_on_the_same_device(
    journal: Journal, clock: Clock
) -> None:
    for job_id in ("a1", "b1", "c1"):
        job(journal, clock, job_id, job_id[0], outcome=None)
    assert journal.reserve("a1", 7, "/images", 10 * MIB, lambda _: None) is None
    assert journal.reserve("b1", 7, "/images", 20 * MIB, lambda _: None) is None
    assert journal.reserve("c1", 8, "/other", 40 * MIB, lambda _: None) is None
    assert journal.reserved_elsewhere("a1", 7) == 20 * MIB
    assert journal.reserved_elsewhere("b1", 7) == 10 * MIB
    assert journal.reserved_elsewhere("c1", 7) == 30 * MIB
    refused = journal.reserve("c1", 7, "/images", MIB, lambda held: f"{held} held")
    assert refused == f"{30 * MIB} held"
    journal.finish_job("b1", outcome=Outcome.FAILED, reason="", bytes_before=None, bytes_after=None,
                       downtime_s=None, duration_s=None)  # fmt: skip
    assert journal.reserved_elsewhere("a1", 7) == 0


def test_last_reclaim_rewrite_rates_and_compression_ratio(journal: Journal, clock: Clock) -> None:
    job(
        journal,
        clock,
        "a1",
        "a",
        steps=(("rewrite", 10), ("define", 1)),
        before_after=(100 * MIB, 40 * MIB),
        disks=(disk("vda", 100 * MIB, 40 * MIB, 0, 80 * MIB),),
    )
    end_of_a1 = clock.now - 100
    job(journal, clock, "a2", "a", outcome=Outcome.FAILED, steps=(("rewrite", 1), ("define", 1)),
        before_after=(100 * MIB, 90 * MIB))  # fmt: skip
    job(
        journal,
        clock,
        "b1",
        "b",
        compression=Compression.NONE,
        steps=(("rewrite", 4), ("define", 1)),
        before_after=(10 * MIB, 5 * MIB),
        disks=(disk("vda", 10 * MIB, 5 * MIB, 0, 4 * MIB),),
    )
    assert journal.last_reclaimed_at("a-uuid") == end_of_a1
    assert journal.last_reclaimed_at("c-uuid") is None
    # Only reclaims count: newest first, the rewrite's bytes before over its duration.
    assert journal.rewrite_rates() == [10 * MIB / 4, 100 * MIB / 10]
    assert journal.rewrite_rates(limit=1) == [10 * MIB / 4]
    assert journal.compression_ratio("a-uuid", "vda", "zstd") == 0.5
    assert journal.compression_ratio("b-uuid", "vda", "none") == 1.25
    assert journal.compression_ratio("b-uuid", "vda", "zstd") is None
    assert journal.compression_ratio("a-uuid", "vdb", "zstd") is None
    assert journal.job_setting("b1", "compression") == "none"
    assert journal.job_setting("b1", "priority") is None


def test_outcome_totals_count_freed_bytes_once_no_backup_holds_them(
    journal: Journal, clock: Clock
) -> None:
    job(journal, clock, "a1", "a", before_after=(100, 40), downtime_s=3.0)
    job(journal, clock, "a2", "a", before_after=(100, 70), downtime_s=2.0)
    job(journal, clock, "a3", "a", outcome=Outcome.FAILED, before_after=(100, 100), downtime_s=1.0)
    job(journal, clock, "b1", "b", before_after=(50, 60))  # grew: freed nothing
    job(journal, clock, "c1", "c", outcome=None)
    journal.record_backup(BackupRecord("/images/a.bak", "a2", "a", "vda", 1, 2, 100, 0, 9))
    assert journal.outcome_totals() == [
        ("a", "failed", 1, 0, 1.0),
        ("a", "reclaimed", 2, 60, 5.0),
        ("b", "reclaimed", 1, 0, 0.0),
    ]
    journal.backup_removed("/images/a.bak", "expired")
    assert journal.outcome_totals()[1] == ("a", "reclaimed", 2, 90, 5.0)


def test_last_jobs_are_each_domains_newest_finished_real_job(
    journal: Journal, clock: Clock
) -> None:
    job(journal, clock, "a1", "a")
    job(journal, clock, "a2", "a", outcome=Outcome.FAILED)
    job(journal, clock, "a3", "a", outcome=Outcome.DRY_RUN)
    job(journal, clock, "b1", "b")
    job(journal, clock, "b2", "b", outcome=None)
    assert [j.id for j in journal.last_jobs()] == ["a2", "b1"]


def test_step_durations_run_to_the_next_step_or_the_end(journal: Journal, clock: Clock) -> None:
    job(journal, clock, "a1", "a", steps=(("inspect", 2), ("mark", 0.5), ("rewrite", 3)))
    job(journal, clock, "b1", "b", outcome=None, steps=(("inspect", 9),))
    assert journal.step_durations() == [
        ("a1", "inspect", 2),
        ("a1", "mark", 0.5),
        ("a1", "rewrite", 3),
    ]
    assert journal.step_durations(ignore=("mark",)) == [
        ("a1", "inspect", 2.5),
        ("a1", "rewrite", 3),
    ]
    assert journal.step_durations(job_id="b1") == []


def test_disk_figures_pair_the_newest_estimate_with_the_newest_reclaim(
    journal: Journal, clock: Clock
) -> None:
    job(journal, clock, "a1", "a", disks=(disk("vda", 100, 40, 45, 30),))
    reclaimed_at = clock.now - 100
    estimated_at = clock.now
    job(journal, clock, "a2", "a", outcome=Outcome.DRY_RUN, disks=(disk("vda", 120, None, 50, 30),))
    job(journal, clock, "b1", "b", outcome=Outcome.FAILED, disks=(disk("vdb", 10, 9, 8, 7),))
    rows = journal.disk_figures()
    assert rows == [
        DiskFigures("a", "vda", estimated_at=estimated_at, bytes_before=120,
                    estimated_after=50, reclaimed_at=reclaimed_at, bytes_after=40),
        DiskFigures("b", "vdb", estimated_at=clock.now - 100, bytes_before=10,
                    estimated_after=8, reclaimed_at=None, bytes_after=None),
    ]  # fmt: skip
