"""What the running daemon is doing: a snapshot in its state folder, and its STATUS= line.

``virt-reclaim status`` runs in another process and cannot ask the daemon (a signal carries
no answer), so the daemon publishes ``STATE_DIR/status.json``: its pid and the start time
the kernel gives that pid (so that a reused pid is not taken for the daemon), its
configuration, the windows, the jobs running and the queue. It is replaced atomically
(temp file + rename) whenever one of these changes, and at least every
PUBLISH_INTERVAL_S, so its ``written_at`` also tells whether the main loop still turns.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pydantic
import structlog

from virt_reclaim.config import crontab
from virt_reclaim.service import statefiles

if TYPE_CHECKING:
    from virt_reclaim.service.daemon import Daemon

STATUS_FILE = "status.json"
# Progress moves without any other change: this bounds how old what a reader sees is.
PUBLISH_INTERVAL_S = 5.0

log = structlog.get_logger("virt_reclaim.service")


class Phase(enum.StrEnum):
    """Where the daemon is in its life."""

    CONNECTING = "connecting"  # configured, waiting for libvirtd before it starts working
    RUNNING = "running"
    STOPPING = "stopping"  # a signal came: jobs end or restore their guests
    STOPPED = "stopped"  # the process is about to exit


@dataclass(frozen=True)
class ConfigState:
    """The configuration in force: its folder, the policy files and policies it holds."""

    config_dir: str
    files: tuple[str, ...]
    policies: tuple[str, ...]
    # Why the last reload was not applied, when it was not: the daemon runs on the last
    # good configuration.
    rejected: str | None


@dataclass(frozen=True)
class WindowState:
    """One enabled policy's window: open until when, or found late, and its next firing."""

    policy: str
    open_until: float | None  # epoch seconds; None: not open
    opens_late_at: float | None  # a window found open at start: it opens then (epoch seconds)
    next_run: float | None  # epoch seconds of the next cron firing (without jitter)
    estimating: bool  # its domains' dry runs are under way
    watched_busy: tuple[str, ...]  # domains busy when it opened, queued if they go idle


@dataclass(frozen=True)
class JobState:
    """A job running now; the rewrite's progress once it is known."""

    domain: str
    uuid: str
    policy: str
    started_at: float  # epoch seconds
    disk: str | None  # the disk being rewritten
    percent: float | None


@dataclass(frozen=True)
class QueuedState:
    """A domain queued by a window, in the order the daemon takes them."""

    domain: str
    uuid: str
    policy: str
    estimated_gain: int
    estimated_s: float
    waiting_for_space: bool  # other jobs hold the host's space; tried again when one ends


@dataclass(frozen=True)
class Snapshot:
    """The file's content; ``proc_start`` is field 22 of /proc/PID/stat (None without /proc)."""

    pid: int
    proc_start: int | None
    started_at: float  # epoch seconds
    written_at: float  # epoch seconds
    phase: Phase
    uri: str
    libvirt_outage: str | None  # why libvirtd is unreachable, while it is
    config: ConfigState
    windows: tuple[WindowState, ...]
    jobs: tuple[JobState, ...]
    queued: tuple[QueuedState, ...]


_ADAPTER = pydantic.TypeAdapter(Snapshot)


def status_path(state_dir: str) -> str:
    """Where the daemon with this state folder publishes its snapshot."""
    return os.path.join(state_dir, STATUS_FILE)


def proc_start(pid: int) -> int | None:
    """When the kernel started ``pid`` (clock ticks since boot), None when it cannot tell.

    With the pid this names one process: a pid reused after the daemon died has another.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        # The command name (field 2) may hold spaces and parentheses: count after its end.
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def write_snapshot(state_dir: str, snapshot: Snapshot) -> None:
    """Replace the snapshot whole (``statefiles``). Raises OSError when it cannot be written."""
    statefiles.replace(state_dir, STATUS_FILE, _ADAPTER.dump_json(snapshot).decode() + "\n")


def read_snapshot(state_dir: str) -> Snapshot | None:
    """The last snapshot, or None when there is none or it is not one.

    Raises OSError when the file exists but cannot be read (another user's state folder).
    """
    try:
        with open(status_path(state_dir)) as f:
            return _ADAPTER.validate_json(f.read())
    except (FileNotFoundError, ValueError):  # pydantic's ValidationError is a ValueError
        return None


class Publisher:
    """Writes the daemon's snapshots: at each change, and every PUBLISH_INTERVAL_S anyway."""

    def __init__(self, interval_s: float = PUBLISH_INTERVAL_S) -> None:
        """Nothing published yet."""
        self.interval_s = interval_s
        self.last: Snapshot | None = None
        self.due = float("-inf")
        self.failing = False
        self._fires: dict[tuple[str, str], float | None] = {}

    def next_run(self, cron: str, timezone: str, wall: float) -> float | None:
        """The next firing after ``wall`` (epoch seconds), worked out again only once it passed.

        Building a cron trigger costs about half a millisecond: not at every tick for every policy.
        """
        key = (cron, timezone)
        if key not in self._fires or (self._fires[key] or float("inf")) <= wall:
            after = dt.datetime.fromtimestamp(wall, dt.UTC)
            fire = crontab.next_fire(cron, timezone, after)
            self._fires[key] = fire.timestamp() if fire else None
        return self._fires[key]

    def publish(self, state_dir: str, snapshot: Snapshot) -> bool:
        """Write ``snapshot`` unless it only repeats the last one early; True if written.

        A folder that cannot be written is logged once (``status.unpublished``), not raised.
        """
        same = self.last is not None and replace(self.last, written_at=0.0) == replace(
            snapshot, written_at=0.0
        )
        now = snapshot.written_at
        if same and now < self.due:
            return False
        try:
            write_snapshot(state_dir, snapshot)
        except OSError as exc:
            if not self.failing:
                log.warning("status.unpublished", path=status_path(state_dir), error=str(exc))
            self.failing = True
            return False
        self.failing = False
        self.last = snapshot
        self.due = now + self.interval_s
        return True


def snapshot_of(daemon: Daemon, phase: Phase, wall: Callable[[], float] = time.time) -> Snapshot:
    """What ``daemon`` is doing now, its monotonic times turned into epoch seconds."""
    now_wall = wall()
    now = daemon.clock()
    offset = now_wall - now
    windows = daemon.windows
    states = []
    for policy in daemon.policies:
        if not policy.enabled:
            continue
        window = windows.open.get(policy.name)
        late = windows.late.get(policy.name)
        schedule = policy.schedule
        fire = daemon.publisher.next_run(schedule.cron, schedule.timezone, now_wall)
        busy = tuple(sorted(name for name, _reason in window.busy.values())) if window else ()
        states.append(WindowState(
            policy=policy.name,
            open_until=window.ends_at + offset if window else None,
            opens_late_at=late.opens_at + offset if late else None,
            next_run=fire,
            estimating=policy.name in windows.estimating,
            watched_busy=busy,
        ))  # fmt: skip
    jobs = [
        JobState(
            job.domain, uuid, job.policy, job.started + offset, *(job.progress or (None, None))
        )
        for uuid, job in sorted(daemon.running.items(), key=lambda kv: kv[1].domain)
    ]
    queued = [
        QueuedState(
            c.name,
            c.uuid,
            c.policy,
            c.estimated_gain,
            round(c.estimated_s, 1),
            waiting_for_space=windows.held.get(c.uuid, now) > now,
        )
        for c in windows.queue
    ]
    outage = daemon.host.outage
    return Snapshot(
        pid=os.getpid(), proc_start=daemon.proc_start, started_at=daemon.started_at,
        written_at=now_wall, phase=phase, uri=daemon.daemon_config.uri,
        libvirt_outage=outage.reason if outage else None,
        config=ConfigState(daemon.config_dir, daemon.files,
                           tuple(p.name for p in daemon.policies), daemon.rejected),
        windows=tuple(states), jobs=tuple(jobs), queued=tuple(queued),
    )  # fmt: skip


def status_line(daemon: Daemon) -> str:
    """STATUS= for systemd: what the daemon does, and whether it runs on an older configuration."""
    if daemon.rejected:
        return f"{_activity(daemon)}; running on the last good configuration: {daemon.rejected}"
    return _activity(daemon)


def _activity(daemon: Daemon) -> str:
    if daemon.host.outage is not None:
        return f"libvirtd unreachable for {daemon.clock() - daemon.host.outage.since:.0f} s"
    parts = []
    if daemon.running:
        names = ", ".join(sorted(j.domain for j in daemon.running.values()))
        parts.append(f"reclaiming {names}")
    if daemon.windows.queue:
        parts.append(f"{len(daemon.windows.queue)} queued")
    if daemon.windows.open:
        parts.append(f"window open: {', '.join(sorted(daemon.windows.open))}")
    if not parts:
        parts.append("waiting for the next window")
    parts.append(f"{len(daemon.policies)} policies, {len(daemon.host.domains)} domains")
    return "; ".join(parts)
