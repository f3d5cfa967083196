"""The journal's read side: the queries of recovery, ``history``, the daemon and the metrics.

A mixin of ``Journal``, which opens the database and writes it (``journal/store.py``).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Collection
from pathlib import Path
from typing import Any

from virt_reclaim.job.results import Outcome
from virt_reclaim.journal.records import (
    BackupRecord,
    ConversionData,
    DiskData,
    DiskFigures,
    DiskState,
    DomainActivity,
    JournalDisk,
    JournalError,
    JournalJob,
)

# The outcome ``history --outcome`` gives a job that recorded no end (running, or interrupted).
UNFINISHED = "unfinished"


class JournalQueries:
    """The journal's queries; every one raises JournalError when the database fails."""

    path: Path
    _db: sqlite3.Connection

    def unfinished(self, domain_uuid: str | None = None) -> list[JournalJob]:
        """Jobs that never recorded an end, oldest first (all domains, or one)."""
        query = "SELECT * FROM jobs WHERE finished_at IS NULL"
        args: tuple[str, ...] = ()
        if domain_uuid is not None:
            query += " AND domain_uuid = ?"
            args = (domain_uuid,)
        return self._jobs(query + " ORDER BY started_at", args)

    def history(
        self,
        domain: str | None = None,
        limit: int = 1000,
        *,
        since: float | None = None,
        outcomes: Collection[str] = (),
    ) -> list[JournalJob]:
        """Jobs, newest first (all domains, or one by name).

        ``since`` (epoch seconds) keeps the jobs started then or later; ``outcomes`` those
        that ended so, where "unfinished" means no end recorded.
        """
        where: list[str] = []
        args: list[Any] = []
        if domain is not None:
            where.append("domain = ?")
            args.append(domain)
        if since is not None:
            where.append("started_at >= ?")
            args.append(since)
        if outcomes:
            ended = sorted(set(outcomes) - {UNFINISHED})
            either = [f"outcome IN ({', '.join('?' * len(ended))})"] if ended else []
            either += ["outcome IS NULL"] if UNFINISHED in outcomes else []
            where.append(f"({' OR '.join(either)})")
            args += ended
        # Only fixed text and "?" placeholders are joined; every value is a bound parameter.
        query = "SELECT * FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "")  # noqa: S608
        return self._jobs(query + " ORDER BY started_at DESC LIMIT ?", (*args, limit))

    def backups(self, *, removed: bool = False) -> list[BackupRecord]:
        """Backups still kept, soonest to expire first (with ``removed``, those gone too)."""
        query = "SELECT * FROM backups"
        if not removed:
            query += " WHERE removed_at IS NULL"
        rows = self._query_all(query + " ORDER BY expires_at, path", ())
        return [BackupRecord(**dict(row)) for row in rows]

    def domain_activity(self) -> list[DomainActivity]:
        """Every domain name the jobs record, with its uuids and its newest record."""
        rows = self._query_all(
            "SELECT domain, group_concat(DISTINCT domain_uuid), "
            "MAX(MAX(started_at, COALESCE(finished_at, 0))), SUM(finished_at IS NULL) "
            "FROM jobs GROUP BY domain ORDER BY domain",
            (),
        )
        return [
            DomainActivity(name, frozenset(uuids.split(",")), last_at, bool(unfinished))
            for name, uuids, last_at, unfinished in rows
        ]

    def reserved_elsewhere(self, job_id: str, device: int) -> int:
        """Bytes the unfinished jobs other than ``job_id`` hold reserved on ``device``."""
        value = self._query_one(
            "SELECT COALESCE(SUM(r.bytes), 0) FROM reservations r JOIN jobs j ON j.id = r.job_id "
            "WHERE r.device = ? AND r.job_id != ? AND j.finished_at IS NULL",
            (device, job_id),
        )
        return int(value[0]) if value is not None else 0

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
                _disk_state(d["state"]),
                d["bytes_before"],
                d["bytes_after"],
                d["estimated_after"],
                d["guest_used"],
                _disk_data(d["data"]),
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
            finished_at=row["finished_at"], step=row["step"], outcome=_outcome(row["outcome"]),
            reason=row["reason"], bytes_before=row["bytes_before"],
            bytes_after=row["bytes_after"], downtime_s=row["downtime_s"],
            duration_s=row["duration_s"], disks=disks, steps=steps, mode=row["mode"],
            estimated_after=row["estimated_after"],
        )  # fmt: skip

    # -- figures for the metrics file (metrics/families.py) -------------------------------

    def outcome_totals(self) -> list[tuple[str, str, int, int, float]]:
        """Per domain and outcome of the finished jobs: count, bytes freed, seconds down.

        Rows of (domain, outcome, jobs, reclaimed bytes, downtime seconds); a job's
        reclaimed bytes are its bytes before less after, never below zero, and count
        only once no backup of the job holds the old image any more.
        """
        rows = self._query_all(
            "SELECT domain, outcome, COUNT(*), "
            "SUM(CASE WHEN outcome = 'reclaimed' AND bytes_after IS NOT NULL "
            "AND bytes_before > bytes_after AND NOT EXISTS (SELECT 1 FROM backups "
            "WHERE backups.job_id = jobs.id AND removed_at IS NULL) "
            "THEN bytes_before - bytes_after ELSE 0 END), "
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

    def disk_figures(self) -> list[DiskFigures]:
        """Per domain and disk target: its newest estimate and its newest reclaim."""
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
        found: dict[tuple[str, str], DiskFigures] = {}
        for domain, target, at, before, after in estimates:
            found[domain, target] = DiskFigures(
                domain, target, estimated_at=at, bytes_before=before, estimated_after=after
            )
        for domain, target, at, after in reclaims:
            row = found.get((domain, target), DiskFigures(domain, target))
            found[domain, target] = dataclasses.replace(row, reclaimed_at=at, bytes_after=after)
        return [found[key] for key in sorted(found)]

    def _query_all(self, query: str, args: tuple[Any, ...]) -> list[Any]:
        try:
            return self._db.execute(query, args).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: {exc}") from exc


def _disk_state(value: str | None) -> DiskState | None:
    """A ``job_disks.state`` as its enum; one this version does not know is an error."""
    if value is None:
        return None
    try:
        return DiskState(value)
    except ValueError:
        raise JournalError(
            f"the journal records a disk state {value!r} this virt-reclaim does not know"
        ) from None


def _outcome(value: str | None) -> Outcome | None:
    """A ``jobs.outcome`` as its enum; one this version does not know is an error."""
    if value is None:
        return None
    try:
        return Outcome(value)
    except ValueError:
        raise JournalError(
            f"the journal records a job outcome {value!r} this virt-reclaim does not know"
        ) from None


def _disk_data(text: str | None) -> DiskData | None:
    """A ``job_disks.data`` JSON object as the record of the mode that wrote it."""
    if not text:
        return None
    try:
        value = json.loads(text)
        return ConversionData.from_json(value) if isinstance(value, dict) else None
    except (ValueError, KeyError) as exc:  # recovery would act on a guess
        raise JournalError(f"the journal records a disk's data it cannot read: {text!r}") from exc
