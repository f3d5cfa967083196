"""The job journal: SQLite (WAL), a row per job, per disk and per step, written before each step.

Recovery reads it to finish or undo a job whose process died; ``history`` and
the daemon's minimum interval read the finished jobs. A journal that is missing
is created; one that cannot be read is an error that stops every new job (never
a silent fresh start), because an unreadable journal may hide a job to recover.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virt_reclaim.errors import VirtReclaimError

DEFAULT_STATE_DIR = "/var/lib/virt-reclaim"
JOURNAL_NAME = "journal.sqlite3"
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    domain_uuid TEXT NOT NULL,
    previous_state TEXT,
    started_at REAL NOT NULL,
    finished_at REAL,
    step TEXT,
    outcome TEXT,
    reason TEXT,
    bytes_before INTEGER,
    bytes_after INTEGER,
    downtime_s REAL,
    duration_s REAL,
    settings TEXT,
    mode TEXT NOT NULL DEFAULT 'offline',
    estimated_after INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_domain ON jobs (domain, started_at);
CREATE TABLE IF NOT EXISTS job_disks (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    target TEXT NOT NULL,
    path TEXT NOT NULL,
    temp_path TEXT NOT NULL,
    backup_path TEXT,
    state TEXT,
    bytes_before INTEGER,
    bytes_after INTEGER,
    estimated_after INTEGER,
    guest_used INTEGER,
    data TEXT,
    PRIMARY KEY (job_id, target)
);
CREATE TABLE IF NOT EXISTS steps (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    seq INTEGER NOT NULL,
    step TEXT NOT NULL,
    started_at REAL NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


# Version 1 journals gain what version 2 added; their jobs were all offline jobs.
_MIGRATE_1_TO_2 = (
    "ALTER TABLE jobs ADD COLUMN mode TEXT NOT NULL DEFAULT 'offline'",
    "ALTER TABLE jobs ADD COLUMN estimated_after INTEGER",
    "ALTER TABLE job_disks ADD COLUMN state TEXT",
    "ALTER TABLE job_disks ADD COLUMN bytes_before INTEGER",
    "ALTER TABLE job_disks ADD COLUMN bytes_after INTEGER",
    "ALTER TABLE job_disks ADD COLUMN estimated_after INTEGER",
    "ALTER TABLE job_disks ADD COLUMN guest_used INTEGER",
    "ALTER TABLE job_disks ADD COLUMN data TEXT",
)


class JournalError(VirtReclaimError):
    """The journal cannot be opened, read or written; no job may run."""


@dataclass(frozen=True)
class JournalDisk:
    """A disk of a job as recovery needs it."""

    target: str
    path: str
    temp_path: str
    backup_path: str | None
    state: str | None = None  # the mode's own record of how far this disk got
    bytes_before: int | None = None
    bytes_after: int | None = None
    estimated_after: int | None = None
    guest_used: int | None = None
    data: dict[str, Any] | None = None  # what the mode needs to recover this disk


@dataclass(frozen=True)
class JournalJob:
    """A job as the journal holds it."""

    id: str
    domain: str
    domain_uuid: str
    previous_state: str | None
    started_at: float
    finished_at: float | None
    step: str | None
    outcome: str | None
    reason: str | None
    bytes_before: int | None
    bytes_after: int | None
    downtime_s: float | None
    duration_s: float | None
    disks: tuple[JournalDisk, ...]
    steps: tuple[str, ...]
    mode: str = "offline"
    estimated_after: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The job as ``history --json`` prints it."""
        return {
            "job_id": self.id,
            "domain": self.domain,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "outcome": self.outcome,
            "reason": self.reason,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "estimated_after": self.estimated_after,
            "mode": self.mode,
            "downtime_s": self.downtime_s,
            "duration_s": self.duration_s,
            "steps": list(self.steps),
        }


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


class Journal:
    """The journal file in a state folder."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        """Open the journal in ``state_dir``, creating the folder and file when missing.

        Raises:
            JournalError: The file exists but is not a readable journal.
        """
        self.path = Path(state_dir) / JOURNAL_NAME
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            problem = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise JournalError(f"journal {self.path} is damaged: {problem}")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 1:
                self._migrate_from_1()
                version = SCHEMA_VERSION
            if version not in (0, SCHEMA_VERSION):
                raise JournalError(
                    f"journal {self.path} has schema version {version}; this virt-reclaim "
                    f"knows {SCHEMA_VERSION}"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise JournalError(
                f"journal {self.path} cannot be used: {exc}; no job will run until it is "
                "repaired or moved away (it may record a job that needs recovery)"
            ) from exc
        except OSError as exc:
            raise JournalError(f"journal {self.path}: {exc.strerror}") from exc

    def _migrate_from_1(self) -> None:
        """Bring a version 1 journal to version 2 in place, in one transaction."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _MIGRATE_1_TO_2:
                self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except sqlite3.Error:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            yield self._db
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise JournalError(f"journal {self.path}: {exc}") from exc

    def begin_job(
        self,
        job_id: str,
        domain: str,
        domain_uuid: str,
        settings: dict[str, Any],
        mode: str = "offline",
    ) -> None:
        """Record that a job of ``mode`` starts."""
        with self._write() as db:
            db.execute(
                "INSERT INTO jobs (id, domain, domain_uuid, started_at, settings, mode) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, domain, domain_uuid, time.time(), json.dumps(settings), mode),
            )

    def record_disk(
        self,
        job_id: str,
        target: str,
        *,
        state: str | None = None,
        data: dict[str, Any] | None = None,
        bytes_before: int | None = None,
        bytes_after: int | None = None,
        estimated_after: int | None = None,
        guest_used: int | None = None,
    ) -> None:
        """Record a disk's state, its mode's data, or its figures; what is None stays."""
        columns = {
            "state": state,
            "data": None if data is None else json.dumps(data),
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "estimated_after": estimated_after,
            "guest_used": guest_used,
        }
        values = {k: v for k, v in columns.items() if v is not None}
        if not values:
            return
        assignments = ", ".join(f"{column} = ?" for column in values)
        with self._write() as db:
            db.execute(
                f"UPDATE job_disks SET {assignments} WHERE job_id = ? AND target = ?",  # noqa: S608 - column names from the allow-list above
                (*values.values(), job_id, target),
            )

    def compression_ratio(self, domain_uuid: str, target: str, compression: str) -> float | None:
        """Bytes after per byte the guest used, from this disk's last reclaim with ``compression``.

        None when the domain has no such reclaim with both figures recorded.
        """
        row = self._query_one(
            "SELECT d.bytes_after, d.guest_used FROM jobs j "
            "JOIN job_disks d ON d.job_id = j.id "
            "WHERE j.domain_uuid = ? AND d.target = ? AND j.outcome = 'reclaimed' "
            "AND json_extract(j.settings, '$.compression') = ? "
            "AND d.bytes_after > 0 AND d.guest_used > 0 "
            "ORDER BY j.started_at DESC LIMIT 1",
            (domain_uuid, target, compression),
        )
        return None if row is None else row[0] / row[1]

    def set_mode(self, job_id: str, mode: str) -> None:
        """Record that the job runs another mode than it began with (live falls back)."""
        with self._write() as db:
            db.execute("UPDATE jobs SET mode = ? WHERE id = ?", (mode, job_id))

    def record_plan(self, job_id: str, previous_state: str, disks: list[JournalDisk]) -> None:
        """Record what recovery needs before anything is changed: state and every path."""
        with self._write() as db:
            db.execute("UPDATE jobs SET previous_state = ? WHERE id = ?", (previous_state, job_id))
            db.executemany(
                "INSERT OR REPLACE INTO job_disks (job_id, target, path, temp_path, backup_path) "
                "VALUES (?, ?, ?, ?, ?)",
                [(job_id, d.target, d.path, d.temp_path, d.backup_path) for d in disks],
            )

    def enter_step(self, job_id: str, step: str) -> None:
        """Record that ``step`` is about to be taken (committed before it is)."""
        with self._write() as db:
            seq = db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM steps WHERE job_id = ?", (job_id,)
            ).fetchone()[0]
            db.execute(
                "INSERT INTO steps (job_id, seq, step, started_at) VALUES (?, ?, ?, ?)",
                (job_id, seq, step, time.time()),
            )
            db.execute("UPDATE jobs SET step = ? WHERE id = ?", (step, job_id))

    def finish_job(
        self,
        job_id: str,
        *,
        outcome: str,
        reason: str,
        bytes_before: int | None,
        bytes_after: int | None,
        downtime_s: float | None,
        duration_s: float | None,
        estimated_after: int | None = None,
    ) -> None:
        """Record how a job ended; it is then no longer recovered."""
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET finished_at = ?, outcome = ?, reason = ?, bytes_before = ?, "
                "bytes_after = ?, downtime_s = ?, duration_s = ?, "
                "estimated_after = COALESCE(?, estimated_after) WHERE id = ?",
                (time.time(), outcome, reason, bytes_before, bytes_after, downtime_s,
                 duration_s, estimated_after, job_id),
            )  # fmt: skip

    def unfinished(self, domain_uuid: str | None = None) -> list[JournalJob]:
        """Jobs that never recorded an end, oldest first (all domains, or one)."""
        query = "SELECT * FROM jobs WHERE finished_at IS NULL"
        args: tuple[str, ...] = ()
        if domain_uuid is not None:
            query += " AND domain_uuid = ?"
            args = (domain_uuid,)
        return self._jobs(query + " ORDER BY started_at", args)

    def history(self, domain: str | None = None, limit: int = 1000) -> list[JournalJob]:
        """Jobs, newest first (all domains, or one by name)."""
        query = "SELECT * FROM jobs"
        args: tuple[Any, ...] = ()
        if domain is not None:
            query += " WHERE domain = ?"
            args = (domain,)
        return self._jobs(query + " ORDER BY started_at DESC LIMIT ?", (*args, limit))

    def last_reclaimed_at(self, domain_uuid: str) -> float | None:
        """When the domain's last reclaimed job ended (epoch seconds), or None."""
        row = self._query_one(
            "SELECT MAX(finished_at) FROM jobs WHERE domain_uuid = ? AND outcome = 'reclaimed'",
            (domain_uuid,),
        )
        return None if row is None else row[0]

    def rewrite_rates(self, limit: int = 20) -> list[float]:
        """Bytes per second of the rewrite step (bytes before / its duration), newest jobs first.

        What this host really achieved, for estimating how long a job will take.
        """
        query = (
            "SELECT j.bytes_before, s1.started_at, s2.started_at FROM jobs j "
            "JOIN steps s1 ON s1.job_id = j.id AND s1.step = 'rewrite' "
            "JOIN steps s2 ON s2.job_id = j.id AND s2.seq = s1.seq + 1 "
            "WHERE j.outcome = 'reclaimed' AND j.bytes_before > 0 "
            "ORDER BY j.started_at DESC LIMIT ?"
        )
        try:
            rows = self._db.execute(query, (limit,)).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: {exc}") from exc
        return [size / (end - start) for size, start, end in rows if end > start]

    def _query_one(self, query: str, args: tuple[Any, ...]) -> Any:  # noqa: ANN401 - a row
        try:
            return self._db.execute(query, args).fetchone()
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: {exc}") from exc

    def _jobs(self, query: str, args: tuple[Any, ...]) -> list[JournalJob]:
        try:
            rows = self._db.execute(query, args).fetchall()
            return [self._job(row) for row in rows]
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: {exc}") from exc

    def _job(self, row: sqlite3.Row) -> JournalJob:
        disks = tuple(
            JournalDisk(
                d["target"],
                d["path"],
                d["temp_path"],
                d["backup_path"],
                d["state"],
                d["bytes_before"],
                d["bytes_after"],
                d["estimated_after"],
                d["guest_used"],
                json.loads(d["data"]) if d["data"] else None,
            )
            for d in self._db.execute(
                "SELECT * FROM job_disks WHERE job_id = ? ORDER BY target", (row["id"],)
            )
        )
        steps = tuple(
            s["step"]
            for s in self._db.execute(
                "SELECT step FROM steps WHERE job_id = ? ORDER BY seq", (row["id"],)
            )
        )
        return JournalJob(
            id=row["id"], domain=row["domain"], domain_uuid=row["domain_uuid"],
            previous_state=row["previous_state"], started_at=row["started_at"],
            finished_at=row["finished_at"], step=row["step"], outcome=row["outcome"],
            reason=row["reason"], bytes_before=row["bytes_before"],
            bytes_after=row["bytes_after"], downtime_s=row["downtime_s"],
            duration_s=row["duration_s"], disks=disks, steps=steps, mode=row["mode"],
            estimated_after=row["estimated_after"],
        )  # fmt: skip

    # -- figures for the metrics file (metrics.py) ----------------------------------------

    def outcome_totals(self) -> list[tuple[str, str, int, int, float]]:
        """Per domain and outcome of the finished jobs: count, bytes freed, seconds down.

        Rows of (domain, outcome, jobs, reclaimed bytes, downtime seconds); a job's
        reclaimed bytes are its bytes before less after, never below zero.
        """
        rows = self._query_all(
            "SELECT domain, outcome, COUNT(*), "
            "SUM(CASE WHEN outcome = 'reclaimed' AND bytes_after IS NOT NULL "
            "AND bytes_before > bytes_after THEN bytes_before - bytes_after ELSE 0 END), "
            "SUM(COALESCE(downtime_s, 0)) FROM jobs WHERE finished_at IS NOT NULL "
            "GROUP BY domain, outcome ORDER BY domain, outcome",
            (),
        )
        return [(r[0], r[1], int(r[2]), int(r[3] or 0), float(r[4] or 0.0)) for r in rows]

    def last_jobs(self) -> list[JournalJob]:
        """Each domain's newest finished job (by name) that is not a dry run."""
        return self._jobs(
            "SELECT * FROM (SELECT *, ROW_NUMBER() OVER "
            "(PARTITION BY domain ORDER BY started_at DESC) AS newest FROM jobs "
            "WHERE finished_at IS NOT NULL AND outcome != 'dry-run') "
            "WHERE newest = 1 ORDER BY domain",
            (),
        )

    def job_setting(self, job_id: str, name: str) -> Any:  # noqa: ANN401 - a JSON value
        """One of the settings a job recorded when it began (None when it has none)."""
        row = self._query_one(
            "SELECT json_extract(settings, ?) FROM jobs WHERE id = ?", (f"$.{name}", job_id)
        )
        return None if row is None else row[0]

    def step_durations(
        self, ignore: tuple[str, ...] = (), job_id: str | None = None
    ) -> list[tuple[str, str, float]]:
        """Seconds each step of the finished jobs took (or of one job): (job id, step, seconds).

        A step lasts from its start to the next step's start, the last one to the job's
        end. ``ignore`` names journal marks that are points inside a step, not steps.
        """
        rows = self._query_all(
            "WITH s AS (SELECT job_id, seq, step, started_at, LEAD(started_at) OVER "
            "(PARTITION BY job_id ORDER BY seq) AS next_at FROM steps "
            "WHERE step NOT IN (SELECT value FROM json_each(?))) "
            "SELECT s.job_id, s.step, COALESCE(s.next_at, j.finished_at) - s.started_at "
            "FROM s JOIN jobs j ON j.id = s.job_id "
            "WHERE j.finished_at IS NOT NULL AND (? IS NULL OR j.id = ?) "
            "ORDER BY j.started_at, s.seq",
            (json.dumps(list(ignore)), job_id, job_id),
        )
        return [(r[0], r[1], max(0.0, float(r[2]))) for r in rows]

    def disk_figures(self) -> list[dict[str, Any]]:
        """Per domain and disk target: its newest estimate and its newest reclaim.

        Each row has ``domain``, ``target``, and (None when there is none)
        ``estimated_at``, ``bytes_before``, ``estimated_after`` (the newest job that
        estimated it), ``reclaimed_at``, ``bytes_after`` (the newest reclaim that
        rewrote it).
        """
        estimates = self._query_all(
            "SELECT domain, target, started_at, bytes_before, estimated_after FROM ("
            "SELECT j.domain, d.target, j.started_at, d.bytes_before, d.estimated_after, "
            "ROW_NUMBER() OVER (PARTITION BY j.domain, d.target ORDER BY j.started_at DESC) "
            "AS newest FROM jobs j JOIN job_disks d ON d.job_id = j.id "
            "WHERE d.estimated_after IS NOT NULL AND d.bytes_before IS NOT NULL) "
            "WHERE newest = 1",
            (),
        )
        reclaims = self._query_all(
            "SELECT domain, target, finished_at, bytes_after FROM ("
            "SELECT j.domain, d.target, j.finished_at, d.bytes_after, "
            "ROW_NUMBER() OVER (PARTITION BY j.domain, d.target ORDER BY j.started_at DESC) "
            "AS newest FROM jobs j JOIN job_disks d ON d.job_id = j.id "
            "WHERE j.outcome = 'reclaimed' AND d.bytes_after IS NOT NULL) "
            "WHERE newest = 1",
            (),
        )
        found: dict[tuple[str, str], dict[str, Any]] = {}
        empty = dict.fromkeys(
            ("estimated_at", "bytes_before", "estimated_after", "reclaimed_at", "bytes_after")
        )
        for domain, target, at, before, after in estimates:
            row = found.setdefault((domain, target), {"domain": domain, "target": target, **empty})
            row.update(estimated_at=at, bytes_before=before, estimated_after=after)
        for domain, target, at, after in reclaims:
            row = found.setdefault((domain, target), {"domain": domain, "target": target, **empty})
            row.update(reclaimed_at=at, bytes_after=after)
        return [found[key] for key in sorted(found)]

    def _query_all(self, query: str, args: tuple[Any, ...]) -> list[Any]:
        try:
            return self._db.execute(query, args).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: {exc}") from exc
