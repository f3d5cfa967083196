"""``virt-reclaim status``: what the running daemon is doing, from the snapshot it publishes."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from virt_reclaim.cli.common import EXIT_FAILED, EXIT_OK
from virt_reclaim.reports import status
from virt_reclaim.units import format_bytes, printable

# As `systemctl status` says of a unit that is not active (LSB "program is not running").
EXIT_NOT_RUNNING = 3


def cmd_status(args: argparse.Namespace) -> int:
    """Print what the daemon is doing; the exit status says whether it runs."""
    try:
        report = status.build_report(args.state_dir)
    except OSError as exc:
        print(f"virt-reclaim: cannot read {args.state_dir}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(report, sys.stdout)
    return EXIT_OK if report.running else EXIT_NOT_RUNNING


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def _span(seconds: float) -> str:
    minutes = int(max(0.0, seconds) // 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes} min"


def print_report(report: status.StatusReport, out: TextIO, now: float | None = None) -> None:
    """The report for a person: one section per part, the daemon's state first."""
    now = time.time() if now is None else now
    snap = report.snapshot
    if snap is None:
        out.write(f"daemon: not running (no snapshot in {report.state_dir})\n")
    elif not report.running:
        out.write(f"daemon: not running (pid {snap.pid} last seen {_when(snap.written_at)})\n")
    else:
        out.write(f"daemon: {snap.phase}, pid {snap.pid}, since {_when(snap.started_at)} "
                  f"(up {_span(now - snap.started_at)}), libvirt {snap.uri}\n")  # fmt: skip
        if report.stale:
            out.write(f"  warning: its snapshot is {_span(now - snap.written_at)} old; its "
                      "main loop may be stuck (see journalctl -u virt-reclaim)\n")  # fmt: skip
        if snap.libvirt_outage:
            out.write(f"  libvirtd unreachable: {printable(snap.libvirt_outage)}\n")
        _print_config(report, out)
        _print_activity(report, out, now)
    out.write(f"backups held: {report.backups_count} ({format_bytes(report.backups_bytes)})\n")
    if report.last_results:
        out.write("last results:\n")
    for job in report.last_results:
        freed = ""
        if job.bytes_before is not None and job.bytes_after is not None:
            freed = f", {format_bytes(job.bytes_before - job.bytes_after)} freed"
        out.write(f"  {job.domain}: {job.outcome} at {_when(job.finished_at)}{freed}"
                  f"{f' ({printable(job.reason)})' if job.reason else ''}\n")  # fmt: skip


def _print_config(report: status.StatusReport, out: TextIO) -> None:
    assert report.snapshot is not None  # noqa: S101 - checked by the caller
    config = report.snapshot.config
    names = ", ".join(config.policies) or "none"
    out.write(f"configuration: {config.config_dir}: {len(config.files)} policy file(s), "
              f"policies {names}\n")  # fmt: skip
    reload = report.last_reload
    if reload is not None:
        out.write(f"  last reload: {_when(reload.at)}, {reload.verdict}\n")
    if config.rejected:
        out.write(f"  running on the last good configuration: {config.rejected}\n")


def _print_activity(report: status.StatusReport, out: TextIO, now: float) -> None:
    assert report.snapshot is not None  # noqa: S101 - checked by the caller
    snap = report.snapshot
    out.write("windows:\n" if snap.windows else "windows: no enabled policy\n")
    for window in snap.windows:
        if window.open_until is not None:
            state = f"open until {_when(window.open_until)} ({_span(window.open_until - now)} left)"
            if window.estimating:
                state += ", estimating"
            if window.watched_busy:
                state += f", watching busy {', '.join(window.watched_busy)}"
        elif window.opens_late_at is not None:
            state = f"found open at start: opens at {_when(window.opens_late_at)}"
        else:
            state = "closed"
        out.write(f"  {window.policy}: {state}; next start {_when(window.next_run)}\n")
    out.write("jobs running:\n" if snap.jobs else "jobs running: none\n")
    for job in snap.jobs:
        step = report.steps.get(job.uuid) or "starting"
        progress = f", {job.disk} {job.percent:.1f}%" if job.percent is not None else ""
        out.write(f"  {job.domain} (policy {job.policy}) since {_when(job.started_at)}: "
                  f"step {step}{progress}\n")  # fmt: skip
    out.write("queued:\n" if snap.queued else "queued: none\n")
    for queued in snap.queued:
        waiting = ", waiting for space" if queued.waiting_for_space else ""
        out.write(f"  {queued.domain} (policy {queued.policy}): estimated gain "
                  f"{format_bytes(queued.estimated_gain)}, about "
                  f"{_span(queued.estimated_s)}{waiting}\n")  # fmt: skip
