"""The daemon's reloads: what of a new configuration applies, and the verdict for ``reload``.

A signal carries no answer: ``systemctl reload`` would report success for a configuration
the daemon rejected. So the daemon writes the result of each reload to
``STATE_DIR/reload.json`` (its pid, a count of its reloads, when, applied or rejected),
atomically, and the reload command waits for the record that follows its signal.
"""

from __future__ import annotations

import enum
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from virt_reclaim.config import loading
from virt_reclaim.service import statefiles

RELOAD_FILE = "reload.json"

log = structlog.get_logger("virt_reclaim.service")


class Verdict(enum.StrEnum):
    """What the daemon did with a configuration it was asked to reload."""

    APPLIED = "applied"
    REJECTED = "rejected"  # errors found: the last good configuration stays in force


@dataclass(frozen=True)
class ReloadRecord:
    """One reload of one daemon process; ``count`` is 1 for its first reload."""

    pid: int
    count: int
    at: float  # epoch seconds
    verdict: Verdict
    errors: int

    def follows(self, before: ReloadRecord | None, pid: int) -> bool:
        """True when this record is ``pid``'s answer to a reload asked after ``before``."""
        if self.pid != pid:
            return False
        return before is None or before.pid != pid or self.count > before.count

    def to_json(self) -> dict[str, Any]:
        """The record as the file holds it."""
        return {**asdict(self), "verdict": self.verdict.value}


def record_path(state_dir: str) -> str:
    """Where the daemon with this state folder records its reloads."""
    return os.path.join(state_dir, RELOAD_FILE)


def write_record(state_dir: str, record: ReloadRecord) -> None:
    """Replace the record atomically (a reader sees the old one or the new one, whole).

    Not fsynced: its reader comes seconds later, and a record lost in a crash is lost with
    the daemon that wrote it. Raises OSError when the folder cannot be written.
    """
    statefiles.replace(state_dir, RELOAD_FILE, json.dumps(record.to_json()) + "\n")


def read_record(state_dir: str) -> ReloadRecord | None:
    """The last record, or None when there is none (or it cannot be read as one)."""
    try:
        with open(record_path(state_dir)) as f:
            data = json.load(f)
        return ReloadRecord(
            pid=int(data["pid"]), count=int(data["count"]), at=float(data["at"]),
            verdict=Verdict(data["verdict"]), errors=int(data["errors"]),
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


def to_apply(
    current: loading.DaemonConfig, loaded: loading.LoadedConfig
) -> loading.LoadedConfig | None:
    """What of a reloaded configuration the daemon applies; None when it is rejected.

    Errors are logged and reject it all (the last good configuration stays in force). The
    libvirt URI and the state folder stay as they are until a restart: jobs, the journal
    and the connection depend on them.
    """
    if loaded.errors:
        for error in loaded.errors:
            log.error("config.error", **error.log_fields())
        log.error("config.reload_failed", errors=len(loaded.errors),
                  kept="the last good configuration stays in force")  # fmt: skip
        return None
    fixed = {"uri": current.uri, "state_dir": current.state_dir}
    for name, value in fixed.items():
        if getattr(loaded.daemon, name) != value:
            log.warning("config.restart_needed", setting=name,
                        new=getattr(loaded.daemon, name), current=value)  # fmt: skip
    return loading.LoadedConfig(loaded.daemon.model_copy(update=fixed), loaded.policies, ())


def record_verdict(state_dir: str, count: int, errors: int) -> str | None:
    """Write the daemon's ``count``th reload's verdict where ``virt-reclaim reload`` waits.

    Returns why the reload was not applied (for STATUS=), or None when it was. A record
    that cannot be written is logged: the reload itself stands.
    """
    at = time.time()
    verdict = Verdict.REJECTED if errors else Verdict.APPLIED
    record = ReloadRecord(os.getpid(), count, at, verdict, errors)
    try:
        write_record(state_dir, record)
    except OSError as exc:
        log.warning("config.reload_unrecorded", path=record_path(state_dir), error=str(exc))
    if verdict is Verdict.APPLIED:
        return None
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
    return f"the reload at {when} was rejected ({errors} error(s))"
