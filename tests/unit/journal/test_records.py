"""The journal's typed records read back what it stores, in the shapes it has always stored.

The ``job_disks`` columns ``state`` and ``data`` and the ``jobs`` column ``settings`` are
text a journal written by an earlier version holds: its rows must read back as records.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from virt_reclaim.job.results import DiskFound, Outcome, Recovered, RecoveryOutcome
from virt_reclaim.job.settings import Compression, JobSettings
from virt_reclaim.journal.records import (
    ConversionData,
    DiskFigures,
    DiskState,
    JournalDisk,
    JournalError,
)
from virt_reclaim.journal.store import JOURNAL_NAME, Journal

# Every state a mode has journaled (job/modes/live.py and conversion.py), as stored.
STORED_STATES = {
    "planned", "snapshotted", "swapping", "swapped", "copied", "committed", "undone",
    "placed", "defined", "clean",
}  # fmt: skip


def test_the_disk_states_are_the_strings_the_journal_stores() -> None:
    assert {str(state) for state in DiskState} == STORED_STATES
    assert all(DiskState(value) == value for value in STORED_STATES)


def test_the_recovery_outcomes_are_the_strings_recover_prints() -> None:
    assert [str(o) for o in RecoveryOutcome] == ["reclaimed", "failed", "unfinished"]


def journal_with_disk(tmp_path: Path) -> Journal:
    journal = Journal(tmp_path / "state")
    journal.begin_job("j1", "vm1", "u1", JobSettings(compression=Compression.ZLIB))
    journal.record_for_recovery("j1", "shutoff", [JournalDisk("vda", "/v/disk.raw", "/v/.t", None)])
    return journal


def raw_disk_row(tmp_path: Path) -> tuple[str | None, str | None]:
    db = sqlite3.connect(tmp_path / "state" / JOURNAL_NAME)
    try:
        return db.execute("SELECT state, data FROM job_disks WHERE job_id = 'j1'").fetchone()  # type: ignore[no-any-return]
    finally:
        db.close()


@pytest.mark.parametrize("data_file", [None, "/v/disk-flat.vmdk"])
def test_conversion_data_round_trips_through_the_journal(
    tmp_path: Path, data_file: str | None
) -> None:
    journal = journal_with_disk(tmp_path)
    data = ConversionData("vmdk", "/v/disk.qcow2", data_file, keep_original=True)

    journal.record_disk("j1", "vda", state=DiskState.PLANNED, data=data)

    [job] = journal.unfinished()
    assert job.disks[0].state is DiskState.PLANNED
    assert job.disks[0].data == data
    state, text = raw_disk_row(tmp_path)
    assert state == "planned"
    assert json.loads(str(text)) == {"convert": True, "format": "vmdk",
                                     "new_path": "/v/disk.qcow2", "data_file": data_file,
                                     "keep_original": True}  # fmt: skip


def test_a_row_written_in_the_old_shape_reads_back(tmp_path: Path) -> None:
    """What a convert job of an earlier version wrote, by hand: a JSON dict and a bare state."""
    Journal(tmp_path / "state").close()
    db = sqlite3.connect(tmp_path / "state" / JOURNAL_NAME, isolation_level=None)
    db.execute(
        "INSERT INTO jobs (id, domain, domain_uuid, started_at, settings, mode) "
        "VALUES ('j1', 'vm1', 'u1', 1.0, ?, 'convert')",
        ('{"compression": "zstd"}',),
    )
    old = ('{"convert": true, "format": "raw", "new_path": "/v/disk.qcow2", '
           '"data_file": null, "keep_original": false}')  # fmt: skip
    db.execute(
        "INSERT INTO job_disks (job_id, target, path, temp_path, backup_path, state, data) "
        "VALUES ('j1', 'vda', '/v/disk.raw', '/v/.t', NULL, 'placed', ?)",
        (old,),
    )
    db.close()

    [job] = Journal(tmp_path / "state").unfinished()

    [disk] = job.disks
    assert disk.state is DiskState.PLACED
    assert disk.data == ConversionData("raw", "/v/disk.qcow2", None, keep_original=False)


def test_data_that_is_not_a_conversion_reads_as_none(tmp_path: Path) -> None:
    journal = journal_with_disk(tmp_path)
    db = sqlite3.connect(tmp_path / "state" / JOURNAL_NAME, isolation_level=None)
    db.execute("UPDATE job_disks SET data = '{\"other\": 1}' WHERE job_id = 'j1'")
    db.close()

    assert journal.unfinished()[0].disks[0].data is None


def test_a_disk_state_this_version_does_not_know_is_a_journal_error(tmp_path: Path) -> None:
    journal = journal_with_disk(tmp_path)
    db = sqlite3.connect(tmp_path / "state" / JOURNAL_NAME, isolation_level=None)
    db.execute("UPDATE job_disks SET state = 'teleported' WHERE job_id = 'j1'")
    db.close()

    with pytest.raises(JournalError, match="'teleported'"):
        journal.unfinished()


def test_the_settings_are_stored_as_their_record(tmp_path: Path) -> None:
    journal = journal_with_disk(tmp_path)

    assert journal.job_setting("j1", "compression") == "zlib"
    db = sqlite3.connect(tmp_path / "state" / JOURNAL_NAME)
    [text] = db.execute("SELECT settings FROM jobs WHERE id = 'j1'").fetchone()
    db.close()
    assert json.loads(text) == JobSettings(compression=Compression.ZLIB).record()


def test_disk_figures_are_the_newest_estimate_and_reclaim(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state")
    for job_id, outcome, after in (("j1", Outcome.RECLAIMED, 30), ("j2", Outcome.DRY_RUN, None)):
        journal.begin_job(job_id, "vm1", "u1", JobSettings())
        journal.record_for_recovery(job_id, "shutoff", [JournalDisk("vda", "/v/d", "/v/.t", None)])
        journal.record_disk(job_id, "vda", bytes_before=100, estimated_after=40,
                            bytes_after=after)  # fmt: skip
        journal.finish_job(job_id, outcome=outcome, reason="", bytes_before=100,
                           bytes_after=after, downtime_s=None, duration_s=None)  # fmt: skip
    journal.begin_job("j3", "vm2", "u2", JobSettings())
    journal.record_for_recovery("j3", "shutoff", [JournalDisk("vdb", "/v/e", "/v/.u", None)])

    [figures] = journal.disk_figures()

    started = {j.id: j.started_at for j in journal.history()}
    finished = {j.id: j.finished_at for j in journal.history()}
    assert figures == DiskFigures(
        "vm1", "vda", estimated_at=started["j2"], bytes_before=100, estimated_after=40,
        reclaimed_at=finished["j1"], bytes_after=30,
    )  # fmt: skip


def test_recovered_prints_its_outcome_as_the_string() -> None:
    found = DiskFound("vda", ("/v/d",), ("/v/d",), None, (), None)
    result = Recovered("j1", "vm1", "swap", RecoveryOutcome.UNFINISHED, ["x"], [found])

    printed = json.loads(json.dumps(result.to_json()))

    assert printed["outcome"] == "unfinished"
    assert set(printed) == {"job_id", "domain", "step", "outcome", "actions", "found"}


def test_a_job_outcome_reads_back_as_its_enum_and_is_stored_as_its_string(tmp_path: Path) -> None:
    journal = journal_with_disk(tmp_path)
    journal.finish_job("j1", outcome=Outcome.NOTHING_TO_DO, reason="", bytes_before=None,
                       bytes_after=None, downtime_s=None, duration_s=None)  # fmt: skip

    [job] = journal.history()

    assert job.outcome is Outcome.NOTHING_TO_DO
    assert job.to_json()["outcome"] == "nothing-to-do"
    db = sqlite3.connect(tmp_path / "state" / JOURNAL_NAME)
    assert db.execute("SELECT outcome FROM jobs").fetchone() == ("nothing-to-do",)
    db.close()


def test_a_job_outcome_this_version_does_not_know_is_a_journal_error(tmp_path: Path) -> None:
    journal = journal_with_disk(tmp_path)
    db = sqlite3.connect(tmp_path / "state" / JOURNAL_NAME, isolation_level=None)
    db.execute("UPDATE jobs SET outcome = 'vanished', finished_at = 2.0 WHERE id = 'j1'")
    db.close()

    with pytest.raises(JournalError, match="'vanished'"):
        journal.history()


@pytest.mark.parametrize("text", ['{"convert": true, "format": "raw"}', "{not json"])
def test_a_conversion_without_its_paths_is_a_journal_error(tmp_path: Path, text: str) -> None:
    journal = journal_with_disk(tmp_path)
    db = sqlite3.connect(tmp_path / "state" / JOURNAL_NAME, isolation_level=None)
    db.execute("UPDATE job_disks SET data = ? WHERE job_id = 'j1'", (text,))
    db.close()

    with pytest.raises(JournalError, match="a disk's data it cannot read"):
        journal.unfinished()
