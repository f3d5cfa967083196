"""A journal written by virt-reclaim with schema version 1 is migrated in place and recovered."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from fakes import FakeDisk, FakeDomain, make_image
from virt_reclaim.journal import recovery
from virt_reclaim.journal.store import JOURNAL_NAME, SCHEMA_VERSION, Journal
from virt_reclaim.model import DomainState

FIXTURE = Path(__file__).parents[2] / "fixtures" / "journal-v1.sqlite3"
UUID = "6f1c2d3e-0000-4000-8000-000000000001"


def v1_journal(state: Path, images: Path) -> None:
    """The fixture, made by the version 1 code, with its paths moved to ``images``."""
    state.mkdir()
    shutil.copy(FIXTURE, state / JOURNAL_NAME)
    db = sqlite3.connect(state / JOURNAL_NAME)
    with db:
        db.execute(
            "UPDATE job_disks SET path = replace(path, '/VRDIR', ?), "
            "temp_path = replace(temp_path, '/VRDIR', ?)",
            (str(images), str(images)),
        )
    db.close()


def test_a_version_1_journal_is_migrated_and_its_unfinished_job_recovered(tmp_path: Path) -> None:
    state = tmp_path / "state"
    v1_journal(state, tmp_path)
    image = make_image(tmp_path / "web-1.qcow2", "64M", ("write -P 0x5a 0 4M",))
    temp = tmp_path / ".web-1.qcow2.virt-reclaim-bbbbbbbbbbbb.tmp"
    make_image(temp, "64M")  # the dead job's half-written rewrite
    domain = FakeDomain([FakeDisk("vda", image)], name="web-1", uuid=UUID,
                        power=DomainState.SHUTOFF)  # fmt: skip

    journal = Journal(state)

    assert sqlite3.connect(state / JOURNAL_NAME).execute("PRAGMA user_version").fetchone()[0] == (
        SCHEMA_VERSION
    )
    [finished] = [j for j in journal.history() if j.finished_at is not None]
    assert (finished.id, finished.mode, finished.bytes_after) == (
        "aaaaaaaaaaaa",
        "offline",
        40 << 20,
    )
    [unfinished] = journal.unfinished()
    assert (unfinished.id, unfinished.mode, unfinished.step) == (
        "bbbbbbbbbbbb",
        "offline",
        "rewrite",
    )
    assert unfinished.disks[0].state is None

    [done] = recovery.recover(journal, str(state), lambda _uuid: domain)

    assert done.job_id == "bbbbbbbbbbbb"
    assert not temp.exists()
    assert domain.power is DomainState.RUNNING  # it was running before the job
    assert journal.unfinished() == []
    # Opening it again finds version 2 and changes nothing.
    assert len(Journal(state).history()) == 2
