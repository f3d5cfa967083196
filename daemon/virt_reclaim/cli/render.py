"""What the commands print for a person: tables, a job's result, the progress bar."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, TextIO

from virt_reclaim.job.results import JobResult
from virt_reclaim.journal.records import JournalJob
from virt_reclaim.units import format_bytes, printable

if TYPE_CHECKING:
    # Types only: history prints with this module and must not import the job's and
    # libvirt's modules that plan and inventory need.
    from virt_reclaim.reports import inventory
    from virt_reclaim.reports.plan import PlanEntry


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


def print_domain_table(
    reports: Sequence[inventory.DomainReport],
    out: TextIO,
    *,
    reclaimable: Mapping[tuple[str, str], int | None] | None = None,
) -> None:
    """Print one row per disk (one per domain without disks), backing files indented below.

    With ``reclaimable`` ((domain, target) -> estimated bytes), a RECLAIMABLE column too.
    """
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
    columns: tuple[str, ...] = header
    if reclaimable is not None:
        columns, rows = _with_reclaimable(header, rows, reports, reclaimable)
    rows = [tuple(printable(cell) for cell in row) for row in rows]
    widths = [max(len(r[i]) for r in (columns, *rows)) for i in range(len(columns) - 1)]
    indent = sum(widths) + 2 * len(widths)
    for index, row in enumerate((columns, *rows)):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")
        for note in notes.get(index - 1, []):
            out.write(" " * indent + "└ " + printable(note) + "\n")


def _with_reclaimable(
    header: tuple[str, ...],
    rows: list[tuple[str, ...]],
    reports: Sequence[inventory.DomainReport],
    reclaimable: Mapping[tuple[str, str], int | None],
) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Add the RECLAIMABLE column before SOURCE, row by row in the table's order."""
    keys: list[tuple[str, str] | None] = []
    for report in reports:
        keys += [(report.name, disk.target) for disk in report.disks] if report.disks else [None]
    cells = [
        "-" if key is None or reclaimable.get(key) is None else format_bytes(reclaimable[key])
        for key in keys
    ]
    with_column = [(*row[:-1], cell, row[-1]) for row, cell in zip(rows, cells, strict=True)]
    return (*header[:-1], "RECLAIMABLE", header[-1]), with_column


def print_plan(entries: Sequence[PlanEntry], out: TextIO) -> None:
    """Print the plan for a person: each domain, its disks, then each policy's total."""
    for entry in entries:
        when = f", next run {entry.next_run}" if entry.next_run else ""
        out.write(f"{entry.domain} ({entry.state}): {entry.policy or '-'}{when}: "
                  f"{entry.outcome}{' - ' + entry.reason if entry.reason else ''}\n")  # fmt: skip
        if entry.free_space:
            out.write(f"  free space first: {entry.free_space}\n")
        for disk in entry.disks:
            gain = disk.estimated_reclaimable
            freed = "" if gain is None else f" ({format_bytes(gain)} reclaimable)"
            out.write(f"  {disk.target}  {disk.path}  "
                      f"{format_bytes(disk.bytes_allocated)} now, "
                      f"{format_bytes(disk.estimated_after)} estimated after"
                      f"{freed}\n")  # fmt: skip
            if disk.converted_to:
                out.write(f"      converted: {disk.format} -> {disk.converted_to}\n")
            if disk.layout is not None:
                out.write(f"      new image: {disk.layout.read_cost}\n")
        for skipped in entry.skipped_disks:
            out.write(f"  {skipped.target}  skipped: {skipped.reason}\n")
        for note in entry.notes:
            out.write(f"  note: {note}\n")
    print_plan_totals(entries, out)


def print_plan_totals(entries: Sequence[PlanEntry], out: TextIO) -> None:
    """Per policy: what its next window would reclaim (the domains it would reclaim), a total.

    Domains below the minimum gain or not eligible are counted apart.
    """
    by_policy: dict[str, list[PlanEntry]] = {}
    for entry in entries:
        if entry.policy is not None:
            by_policy.setdefault(entry.policy, []).append(entry)
    if not by_policy:
        return
    out.write("\nestimated reclaimable, by policy:\n")
    total = 0
    for name, group in sorted(by_policy.items()):
        would = [e for e in group if e.outcome == "would-reclaim"]
        gain = sum(e.estimated_reclaimable or 0 for e in would)
        total += gain
        below = sum(e.estimated_reclaimable or 0 for e in group if e.outcome == "nothing-to-do")
        extra = f"; {format_bytes(below)} more below its minimum gain" if below else ""
        out.write(f"  {name}: {format_bytes(gain)} in {len(would)} of {len(group)} "
                  f"domain(s){extra}\n")  # fmt: skip
    out.write(f"  total: {format_bytes(total)}\n")
