"""What the commands print for a person: tables, a job's result, the progress bar."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO

from virt_reclaim import inventory
from virt_reclaim.job import JobResult
from virt_reclaim.journal import JournalJob
from virt_reclaim.units import format_bytes


class ProgressBar:
    """A one-line progress bar of the rewrite on a terminal."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.shown = False

    def update(self, target: str, percent: float) -> None:
        """Redraw the bar at ``percent`` of ``target``'s rewrite."""
        filled = int(percent / 100 * 30)
        self.out.write(f"\r  rewriting {target} [{'#' * filled}{'.' * (30 - filled)}] "
                       f"{percent:5.1f}%")  # fmt: skip
        self.out.flush()
        self.shown = True

    def close(self) -> None:
        """End the bar's line, if it was drawn."""
        if self.shown:
            self.out.write("\n")
            self.out.flush()


def print_job_result(result: JobResult, out: TextIO) -> None:
    """Print a job's outcome for a person."""
    out.write(f"{result.domain}: {result.outcome} - {result.reason}\n")
    for disk in result.disks:
        after = disk.bytes_after if disk.bytes_after is not None else disk.estimated_after
        label = "" if disk.bytes_after is not None else " (estimated)"
        out.write(f"  {disk.target}  {disk.path}  {format_bytes(disk.bytes_before)} -> "
                  f"{format_bytes(after)}{label}\n")  # fmt: skip
        if disk.backup:
            out.write(f"      original kept at {disk.backup}\n")
    for skipped in result.skipped_disks:
        out.write(f"  {skipped.target}  skipped: {skipped.reason}\n")
    out.write(f"  downtime {result.downtime_s:.1f} s, duration {result.duration_s:.1f} s\n")


def print_history_table(jobs: Sequence[JournalJob], out: TextIO) -> None:
    """Print one row per past job, newest first, with its reason last."""
    header = (
        "STARTED", "DOMAIN", "OUTCOME", "BEFORE", "ESTIMATE", "AFTER", "DOWNTIME", "DURATION"
    )  # fmt: skip
    rows = [
        (
            job.to_json()["started_at"] or "-", job.domain, job.outcome or "unfinished",
            format_bytes(job.bytes_before), format_bytes(job.estimated_after),
            format_bytes(job.bytes_after),
            "-" if job.downtime_s is None else f"{job.downtime_s:.1f} s",
            "-" if job.duration_s is None else f"{job.duration_s:.1f} s",
        )
        for job in jobs
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row, job in zip((header, *rows), (None, *jobs), strict=True):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write(line + ("  REASON" if job is None else f"  {job.reason or ''}") + "\n")


def print_domain_table(reports: Sequence[inventory.DomainReport], out: TextIO) -> None:
    """Print one row per disk (one per domain without disks), backing files indented below."""
    header = (
        "DOMAIN",
        "STATE",
        "PERSISTENT",
        "AGENT",
        "OS",
        "FREE-SPACE",
        "DISK",
        "FORMAT",
        "VIRTUAL",
        "ALLOCATED",
        "SNAPSHOTS",
        "SOURCE",
    )
    rows: list[tuple[str, ...]] = []
    notes: dict[int, list[str]] = {}
    for report in reports:
        agent = (
            ("connected" if report.agent_connected else "disconnected")
            if report.has_agent_channel
            else "none"
        )
        method, _, why = report.free_space.partition(" ")
        domain_cols = (report.name, str(report.state), "yes" if report.persistent else "no", agent,
                       report.os or "-", method)  # fmt: skip
        if not report.disks:
            rows.append((*domain_cols, "-", "-", "-", "-", "-", "(no disks)"))
        for disk in report.disks:
            rows.append(
                (
                    *domain_cols,
                    disk.target,
                    disk.format or "-",
                    format_bytes(disk.virtual_size),
                    format_bytes(disk.allocated_bytes),
                    "-" if disk.internal_snapshots is None else str(disk.internal_snapshots),
                    disk.source or "-",
                )
            )
            extra = [f"backing: {b.path} ({b.format or '?'})" for b in disk.backing_chain]
            if disk.error:
                extra.append(f"error: {disk.error}")
            if why and domain_cols[0]:
                extra.append(f"free space: {method} {why}")
            if extra:
                notes[len(rows) - 1] = extra
            domain_cols = ("", "", "", "", "", "")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    indent = sum(widths) + 2 * len(widths)
    for index, row in enumerate((header, *rows)):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")
        for note in notes.get(index - 1, []):
            out.write(" " * indent + "└ " + note + "\n")
