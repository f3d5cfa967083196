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
import stat
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from virt_reclaim.job.results import Outcome
from virt_reclaim.journal.queries import JournalQueries
from virt_reclaim.journal.records import (
    BackupRecord,
    DiskData,
    DiskState,
    JournalDisk,
    JournalError,
)

if TYPE_CHECKING:
    from virt_reclaim.job.settings import JobSettings

DEFAULT_STATE_DIR = "/var/lib/virt-reclaim"
JOURNAL_NAME = "journal.sqlite3"
SCHEMA_VERSION = 3

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
CREATE TABLE IF NOT EXISTS backups (
    path TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    domain TEXT NOT NULL,
    target TEXT NOT NULL,
    device INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    removed_at REAL,
    removed_why TEXT
);
CREATE TABLE IF NOT EXISTS reservations (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    device INTEGER NOT NULL,
    folder TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (job_id, device)
);
CREATE TABLE IF NOT EXISTS steps (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    seq INTEGER NOT NULL,
    step TEXT NOT NULL,
    started_at REAL NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


# Version 1 journals gain what version 2 added; their jobs were all offline jobs. Version 3
# added the backups and reservations tables only (created with the schema): version 2
# journals take them as they are.
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


class Journal(JournalQueries):
    """The journal file in a state folder: opened and written here, read by ``JournalQueries``."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        """Open the journal in ``state_dir``, creating the folder and file when missing.

        Raises:
            JournalError: The file exists but is not a readable journal.
        """
        self.path = Path(state_dir) / JOURNAL_NAME
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _check_private(self.path.parent, directory=True)
            if self.path.exists() or self.path.is_symlink():
                _check_private(self.path, directory=False)
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
                version = 2
            if version not in (0, 2, SCHEMA_VERSION):
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
            self._db.execute("PRAGMA user_version=2")
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
        except BaseException:
            # A reader inside the transaction failed (JournalError, a check that raised).
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def begin_job(
        self,
        job_id: str,
        domain: str,
        domain_uuid: str,
        settings: JobSettings,
        mode: str = "offline",
    ) -> None:
        """Record that a job of ``mode`` starts, and what the journal keeps of its settings."""
        with self._write() as db:
            db.execute(
                "INSERT INTO jobs (id, domain, domain_uuid, started_at, settings, mode) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, domain, domain_uuid, time.time(), json.dumps(settings.record()), mode),
            )

    def record_disk(
        self,
        job_id: str,
        target: str,
        *,
        state: DiskState | None = None,
        data: DiskData | None = None,
        bytes_before: int | None = None,
        bytes_after: int | None = None,
        estimated_after: int | None = None,
        guest_used: int | None = None,
    ) -> None:
        """Record a disk's state, its mode's data, or its figures; what is None stays."""
        columns = {
            "state": None if state is None else str(state),
            "data": None if data is None else json.dumps(data.to_json()),
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

    def set_mode(self, job_id: str, mode: str) -> None:
        """Record that the job runs another mode than it began with (live falls back)."""
        with self._write() as db:
            db.execute("UPDATE jobs SET mode = ? WHERE id = ?", (mode, job_id))

    def record_for_recovery(
        self, job_id: str, previous_state: str, disks: list[JournalDisk]
    ) -> None:
        """Record what recovery needs before anything is changed: state and every path."""
        with self._write() as db:
            db.execute("UPDATE jobs SET previous_state = ? WHERE id = ?", (previous_state, job_id))
            db.executemany(
                "INSERT OR REPLACE INTO job_disks (job_id, target, path, temp_path, backup_path) "
                "VALUES (?, ?, ?, ?, ?)",
                [(job_id, d.target, d.path, d.temp_path, d.backup_path) for d in disks],
            )

    def reserve(
        self,
        job_id: str,
        device: int,
        folder: str,
        need: int,
        fits: Callable[[int], str | None],
    ) -> str | None:
        """Reserve ``need`` bytes on the host filesystem ``device`` for the job, if they fit.

        ``fits`` is told the bytes the other unfinished jobs hold reserved there and
        returns why the need does not fit beside them, or None. Read and written in
        one transaction under the journal's lock: every job on the host (the daemon's
        workers, a ``run`` beside it) sees the others. A job's reservations go when it
        is finished (``finish_job``, recovery included).
        """
        with self._write() as db:
            problem = fits(self.reserved_elsewhere(job_id, device))
            if problem is None:
                db.execute(
                    "INSERT OR REPLACE INTO reservations (job_id, device, folder, bytes) "
                    "VALUES (?, ?, ?, ?)",
                    (job_id, device, folder, need),
                )
            return problem

    def record_backup(self, backup: BackupRecord) -> None:
        """Record an original kept as a backup: it is deleted once it expires."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO backups (path, job_id, domain, target, device, inode, "
                "bytes, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (backup.path, backup.job_id, backup.domain, backup.target, backup.device,
                 backup.inode, backup.bytes, backup.created_at, backup.expires_at),
            )  # fmt: skip

    def backup_removed(self, path: str, why: str) -> None:
        """Record that a backup is gone (deleted at expiry, or found missing)."""
        with self._write() as db:
            db.execute(
                "UPDATE backups SET removed_at = ?, removed_why = ? WHERE path = ?",
                (time.time(), why, path),
            )

    def forget_domains(self, names: Collection[str]) -> dict[str, int]:
        """Delete the finished jobs of these domains (and their disks, steps and gone backups).

        A job whose backup is still kept stays (the backup is listed, and deleted at expiry,
        through it); so does an unfinished one, which recovery may need. Returns the jobs
        deleted, by domain.
        """
        if not names:
            return {}
        marks = ", ".join("?" * len(names))
        # Only "?" placeholders are joined into the text; the names are bound parameters.
        doomed = (
            f"SELECT id FROM jobs WHERE domain IN ({marks}) AND finished_at IS NOT NULL "  # noqa: S608
            "AND id NOT IN (SELECT job_id FROM backups WHERE removed_at IS NULL)"
        )
        with self._write() as db:
            counted = db.execute(
                f"SELECT domain, COUNT(*) FROM jobs WHERE id IN ({doomed}) GROUP BY domain",  # noqa: S608
                tuple(names),
            ).fetchall()
            for table in ("backups", "reservations", "steps", "job_disks"):
                db.execute(f"DELETE FROM {table} WHERE job_id IN ({doomed})", tuple(names))  # noqa: S608
            db.execute(f"DELETE FROM jobs WHERE id IN ({doomed})", tuple(names))  # noqa: S608
        return {domain: count for domain, count in counted}

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
        outcome: Outcome,
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
                (time.time(), str(outcome), reason, bytes_before, bytes_after, downtime_s,
                 duration_s, estimated_after, job_id),
            )  # fmt: skip
            db.execute("DELETE FROM reservations WHERE job_id = ?", (job_id,))


def _check_private(path: Path, *, directory: bool) -> None:
    """Refuse a state folder or journal that someone else could have written.

    Recovery deletes the files the journal names, as root: whoever can write the
    journal chooses what it deletes.
    """
    st = os.lstat(path)
    kind = "folder" if directory else "file"
    if (directory and not stat.S_ISDIR(st.st_mode)) or (
        not directory and not stat.S_ISREG(st.st_mode)
    ):
        raise JournalError(f"journal {kind} {path} is not a plain {kind} (a symlink?)")
    if st.st_uid != os.geteuid():
        raise JournalError(
            f"journal {kind} {path} belongs to uid {st.st_uid}, not to this service "
            f"(uid {os.geteuid()}): whoever writes the journal chooses what recovery deletes"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise JournalError(
            f"journal {kind} {path} is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); make it {'0700' if directory else '0600'}"
        )
