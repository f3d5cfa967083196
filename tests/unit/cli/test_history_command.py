"""``history --since --limit --outcome``, through the command line, on a journal filled here."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.daemon import write_config
from virt_reclaim.job.results import Outcome
from virt_reclaim.job.settings import JobSettings
from virt_reclaim.journal.store import JOURNAL_NAME, Journal

HOUR = 3600.0
# (job id, domain, outcome or None for unfinished, started this long ago), oldest first.
JOBS = (
    ("j1", "web-1", "reclaimed", 240 * HOUR),
    ("j2", "web-2", "failed", 72 * HOUR),
    ("j3", "db-1", "abandoned", 2 * HOUR),
    ("j4", "web-1", None, 0.5 * HOUR),
    ("j5", "web-2", "nothing-to-do", 0.1 * HOUR),
)


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """A configuration folder whose state_dir holds a journal with JOBS."""
    state = tmp_path / "state"
    journal = Journal(state)
    for job_id, domain, outcome, _ago in JOBS:
        journal.begin_job(job_id, domain, f"uuid-{domain}", JobSettings())
        if outcome is not None:
            journal.finish_job(job_id, outcome=Outcome(outcome), reason="", bytes_before=None,
                               bytes_after=None, downtime_s=None, duration_s=None)  # fmt: skip
    journal.close()
    now = time.time()
    with sqlite3.connect(state / JOURNAL_NAME) as db:
        for job_id, _domain, _outcome, ago in JOBS:
            db.execute("UPDATE jobs SET started_at = ? WHERE id = ?", (now - ago, job_id))
    db.close()
    etc = write_config(tmp_path / "etc", f'state_dir = "{state}"\n', {})
    return etc, state


def history(etc: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virt_reclaim", "history", "--config-dir", str(etc), *options],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def job_ids(etc: Path, *options: str) -> list[str]:
    result = history(etc, "--json", *options)
    assert result.returncode == 0, result.stderr
    return [job["job_id"] for job in json.loads(result.stdout)]


def test_no_filter_lists_every_job_newest_first(folders: tuple[Path, Path]) -> None:
    assert job_ids(folders[0]) == ["j5", "j4", "j3", "j2", "j1"]


@pytest.mark.parametrize(
    ("since", "expected"),
    [("1d", ["j5", "j4", "j3"]), ("90m", ["j5", "j4"]), ("30d", ["j5", "j4", "j3", "j2", "j1"])],
)
def test_since_a_duration(folders: tuple[Path, Path], since: str, expected: list[str]) -> None:
    assert job_ids(folders[0], "--since", since) == expected


def test_since_a_date_in_utc_or_with_its_offset(folders: tuple[Path, Path]) -> None:
    four_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=4)
    naive = four_days_ago.replace(tzinfo=None).isoformat(timespec="minutes")
    paris = four_days_ago.astimezone(dt.timezone(dt.timedelta(hours=1))).isoformat()

    assert job_ids(folders[0], "--since", naive) == ["j5", "j4", "j3", "j2"]
    assert job_ids(folders[0], "--since", paris) == ["j5", "j4", "j3", "j2"]
    assert job_ids(folders[0], "--since", "2000-01-01") == ["j5", "j4", "j3", "j2", "j1"]


def test_outcomes_repeated_or_comma_separated(folders: tuple[Path, Path]) -> None:
    etc = folders[0]
    assert job_ids(etc, "--outcome", "failed,abandoned") == ["j3", "j2"]
    assert job_ids(etc, "--outcome", "failed", "--outcome", "unfinished") == ["j4", "j2"]
    assert job_ids(etc, "--outcome", "unfinished") == ["j4"]
    assert job_ids(etc, "--outcome", "dry-run") == []


def test_limit_and_every_filter_together(folders: tuple[Path, Path]) -> None:
    etc = folders[0]
    assert job_ids(etc, "--limit", "2") == ["j5", "j4"]
    assert job_ids(etc, "web-2", "--since", "30d", "--outcome", "failed,nothing-to-do",
                   "--limit", "1") == ["j5"]  # fmt: skip
    assert job_ids(etc, "web-1", "--outcome", "reclaimed") == ["j1"]


def test_the_table_is_filtered_too(folders: tuple[Path, Path]) -> None:
    result = history(folders[0], "--since", "1d", "--outcome", "abandoned,unfinished")

    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.startswith("STARTED")
    assert [row.split()[1:3] for row in rows] == [["web-1", "unfinished"], ["db-1", "abandoned"]]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--outcome", "failed,bogus"), "'bogus': not an outcome; choose from reclaimed,"),
        (("--outcome", "Failed"), "'Failed': not an outcome"),
        (("--limit", "0"), "'0' is not a positive whole number"),
        (("--limit", "ten"), "'ten' is not a positive whole number"),
        (("--since", "yesterday"), "'yesterday' is neither a duration (30m, 12h, 7d) nor a date"),
        (("--since", "2026-13-01"), "is neither a duration"),
    ],
)
def test_bad_values_are_usage_errors(
    folders: tuple[Path, Path], options: tuple[str, ...], message: str
) -> None:
    result = history(folders[0], *options)

    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
