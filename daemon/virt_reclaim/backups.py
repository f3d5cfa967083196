"""Originals kept as backups: journaled when kept, listed, and deleted once they expire.

A backup is a hard link to the original image, made just before the new image is
renamed over it (or, for a conversion, the original left at its own path). Until
it is deleted the old image's blocks stay allocated on the host: its bytes are not
reclaimed yet. Each one is journaled with its device and inode and an expiry; the
daemon (at its start and every hour) and ``virt-reclaim backups --prune`` delete
the expired ones, and only a path that still holds the very file that was kept.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

import structlog

from virt_reclaim.journal.records import BackupRecord, JournalError
from virt_reclaim.journal.store import Journal

log = structlog.get_logger("virt_reclaim.backups")

# The daemon deletes expired backups this often (and at its start).
PRUNE_INTERVAL_S = 3600.0


def keep(
    journal: Journal | None,
    *,
    path: str,
    job_id: str,
    domain: str,
    target: str,
    keep_s: float,
    now: float | None = None,
) -> BackupRecord:
    """Journal the file at ``path`` as a backup that expires ``keep_s`` seconds from now."""
    now = time.time() if now is None else now
    st = os.lstat(path)
    record = BackupRecord(
        path=path, job_id=job_id, domain=domain, target=target, device=st.st_dev,
        inode=st.st_ino, bytes=st.st_blocks * 512, created_at=now, expires_at=now + keep_s,
    )  # fmt: skip
    if journal is not None:
        journal.record_backup(record)
    return record


def held_bytes(record: BackupRecord) -> int | None:
    """Bytes the backup holds on the host now; None when its path no longer holds it.

    A file with other links frees nothing when this one goes: it holds 0 bytes.
    """
    try:
        st = os.lstat(record.path)
    except FileNotFoundError:
        return None
    if not _is_kept_file(st, record):
        return None
    return _sole_bytes(st)


@dataclass(frozen=True)
class Pruned:
    """What became of one expired backup: ``removed`` (``freed`` bytes), ``gone`` or ``changed``."""

    record: BackupRecord
    action: str
    freed: int = 0


def prune(journal: Journal, now: float | None = None) -> list[Pruned]:
    """Delete every expired backup that its path still holds; journal each one as removed."""
    now = time.time() if now is None else now
    done = []
    for record in journal.backups():
        if record.expires_at > now:
            continue
        done.append(_remove(journal, record))
    return done


def prune_in(state_dir: str) -> bool:
    """The daemon's pass over the journal in ``state_dir``: True when a backup went.

    An error is logged (``backups.prune_failed``), not raised: the next pass tries again.
    """
    try:
        return bool(prune(Journal(state_dir)))
    except (JournalError, OSError) as exc:
        log.error("backups.prune_failed", error=str(exc))
        return False


def _remove(journal: Journal, record: BackupRecord) -> Pruned:
    fields = {"path": record.path, "domain": record.domain, "target": record.target,
              "job_id": record.job_id}  # fmt: skip
    try:
        st = os.lstat(record.path)
    except FileNotFoundError:
        journal.backup_removed(record.path, "gone before it expired")
        log.warning("backup.gone", **fields)
        return Pruned(record, "gone")
    if not _is_kept_file(st, record):
        # Not the file that was kept (replaced, or a link planted at its name): not ours.
        journal.backup_removed(record.path, "the path holds another file: left alone")
        log.warning("backup.changed", **fields)
        return Pruned(record, "changed")
    freed = _sole_bytes(st)
    os.unlink(record.path)
    journal.backup_removed(record.path, "expired")
    log.info("backup.removed", bytes=freed, **fields)
    return Pruned(record, "removed", freed)


def _sole_bytes(st: os.stat_result) -> int:
    """What deleting this name gives back: its blocks, unless another name holds them."""
    return st.st_blocks * 512 if st.st_nlink == 1 else 0


def _is_kept_file(st: os.stat_result, record: BackupRecord) -> bool:
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (record.device, record.inode)
