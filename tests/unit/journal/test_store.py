"""The journal refuses a state folder or file that someone other than the service could write.

Recovery deletes the files the journal names, as root: whoever writes the journal
would choose what it deletes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virt_reclaim.journal.records import JournalError
from virt_reclaim.journal.store import JOURNAL_NAME, Journal

NOBODY = 65534


def test_a_folder_writable_by_others_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)

    with pytest.raises(JournalError, match="writable by group or others \\(mode 0777\\)"):
        Journal(state)


def test_a_journal_file_of_another_user_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Journal(state).close()
    os.chown(state / JOURNAL_NAME, NOBODY, NOBODY)

    with pytest.raises(JournalError, match=f"belongs to uid {NOBODY}"):
        Journal(state)


def test_a_journal_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    elsewhere = tmp_path / "planted.sqlite3"
    Journal(tmp_path / "other").close()
    os.link(tmp_path / "other" / JOURNAL_NAME, elsewhere)
    (state / JOURNAL_NAME).symlink_to(elsewhere)

    with pytest.raises(JournalError, match="not a plain file"):
        Journal(state)


def test_the_service_own_private_journal_opens(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state")
    assert journal.unfinished() == []
    assert (tmp_path / "state").stat().st_mode & 0o077 == 0
