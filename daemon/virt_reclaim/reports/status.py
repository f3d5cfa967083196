"""What ``virt-reclaim status`` reports: the daemon's snapshot, checked, and the journal's view.

The daemon publishes what it does (``service/status.py``); this module decides whether
that snapshot still speaks for a live daemon (its pid runs, and is the very process that
wrote it: same kernel start time) and adds what the journal knows: each running job's
step, the backups held and each domain's last result.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from virt_reclaim import backups
from virt_reclaim.journal.records import JournalJob
from virt_reclaim.journal.store import JOURNAL_NAME, Journal
from virt_reclaim.service import status
from virt_reclaim.service.reloads import ReloadRecord, read_record
from virt_reclaim.units import iso_time

# A snapshot older than this while its process runs: the daemon's main loop seems stuck.
STALE_S = 6 * status.PUBLISH_INTERVAL_S


@dataclass(frozen=True)
class StatusReport:
    """Everything ``status`` prints; ``snapshot`` is None when no daemon ever published one.

    ``running`` says whether the snapshot's process is the running daemon; when it is not,
    the snapshot only tells when it was last seen, not what runs now.
    """

    state_dir: str
    snapshot: status.Snapshot | None
    running: bool
    stale: bool
    last_reload: ReloadRecord | None  # the running daemon's last reload, if it had one
    steps: dict[str, str | None] = field(default_factory=dict)  # running job's step, by uuid
    backups_count: int = 0
    backups_bytes: int = 0
    last_results: list[JournalJob] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The object ``status --json`` prints (keys documented in README.md)."""
        snap = self.snapshot
        live = snap if self.running else None
        reload = self.last_reload
        return {
            "daemon": {
                "running": self.running,
                "pid": snap.pid if snap else None,
                "since": iso_time(live.started_at) if live else None,
                "phase": str(live.phase) if live else None,
                "snapshot_at": iso_time(snap.written_at) if snap else None,
                "stale": self.stale,
                "uri": live.uri if live else None,
                "libvirt_outage": live.libvirt_outage if live else None,
            },
            "config": None if live is None else {
                "config_dir": live.config.config_dir,
                "files": list(live.config.files),
                "policies": list(live.config.policies),
                "last_reload": None if reload is None else {
                    "at": iso_time(reload.at), "verdict": str(reload.verdict),
                    "errors": reload.errors,
                },
                "on_last_good": live.config.rejected is not None,
                "rejected": live.config.rejected,
            },
            "windows": [_window_json(w) for w in live.windows] if live else [],
            "jobs": [{
                "domain": j.domain, "policy": j.policy, "started_at": iso_time(j.started_at),
                "step": self.steps.get(j.uuid), "disk": j.disk, "percent": j.percent,
            } for j in live.jobs] if live else [],
            "queued": [{
                "domain": q.domain, "policy": q.policy, "estimated_gain": q.estimated_gain,
                "estimated_s": q.estimated_s, "waiting_for_space": q.waiting_for_space,
            } for q in live.queued] if live else [],
            "backups": {"count": self.backups_count, "bytes": self.backups_bytes},
            "last_results": [{
                "domain": j.domain, "job_id": j.id, "outcome": j.outcome, "reason": j.reason,
                "finished_at": iso_time(j.finished_at), "bytes_before": j.bytes_before,
                "bytes_after": j.bytes_after,
            } for j in self.last_results],
        }  # fmt: skip


def _window_json(window: status.WindowState) -> dict[str, Any]:
    return {
        "policy": window.policy,
        "open": window.open_until is not None,
        "open_until": iso_time(window.open_until),
        "opens_late_at": iso_time(window.opens_late_at),
        "next_run": iso_time(window.next_run),
        "estimating": window.estimating,
        "watched_busy": list(window.watched_busy),
    }


def is_alive(snapshot: status.Snapshot) -> bool:
    """True when the process that wrote ``snapshot`` runs and has not said it stopped.

    A pid the kernel has given to another process since has another start time.
    """
    if snapshot.phase is status.Phase.STOPPED:
        return False
    try:
        os.kill(snapshot.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    started = status.proc_start(snapshot.pid)
    if snapshot.proc_start is None or started is None:
        return True  # no /proc to tell: the pid alone
    return started == snapshot.proc_start


def build_report(state_dir: str, now: float | None = None) -> StatusReport:
    """Read the snapshot and the journal of ``state_dir`` (the journal is never created).

    Raises OSError when the snapshot exists but cannot be read, JournalError when the
    journal cannot be.
    """
    now = time.time() if now is None else now
    snapshot = status.read_snapshot(state_dir)
    running = snapshot is not None and is_alive(snapshot)
    stale = running and snapshot is not None and now - snapshot.written_at > STALE_S
    reload = read_record(state_dir)
    if reload is not None and (not running or snapshot is None or reload.pid != snapshot.pid):
        reload = None  # another process's reload: not this daemon's configuration
    report = StatusReport(state_dir, snapshot, running, stale, reload)
    if not os.path.exists(os.path.join(state_dir, JOURNAL_NAME)):
        return report
    journal = Journal(state_dir)
    try:
        kept = journal.backups()
        held = [backups.held_bytes(b) for b in kept]
        return StatusReport(
            state_dir, snapshot, running, stale, reload,
            steps={job.domain_uuid: job.step for job in journal.unfinished()},
            backups_count=len(kept), backups_bytes=sum(h or 0 for h in held),
            last_results=journal.last_jobs(),
        )  # fmt: skip
    finally:
        journal.close()
