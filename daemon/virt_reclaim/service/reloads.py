"""The verdict of the daemon's last reload, in a file that ``virt-reclaim reload`` reads.

A signal carries no answer: ``systemctl reload`` would report success for a configuration
the daemon rejected. So the daemon writes the result of each reload to
``STATE_DIR/reload.json`` (its pid, a count of its reloads, when, applied or rejected),
atomically, and the reload command waits for the record that follows its signal.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

RELOAD_FILE = "reload.json"


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
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".reload-", suffix=".json", dir=state_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record.to_json(), f)
            f.write("\n")
        os.replace(temp, record_path(state_dir))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


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
