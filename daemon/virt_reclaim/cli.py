"""The ``virt-reclaim`` command line: subcommands, output formats and exit statuses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from virt_reclaim import __version__, inventory, qemu_img
from virt_reclaim.units import format_bytes
from virt_reclaim.virt import DEFAULT_URI, Hypervisor, VirtError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="virt-reclaim",
        description=(
            "Reclaim the free space of idle KVM guests' qcow2 disks: trim or zero-fill "
            "inside the guest, then rewrite the image compacted and compressed."
        ),
        epilog=(
            "Exit status: 0 success, 1 failure, 2 usage error. "
            "Run 'virt-reclaim COMMAND --help' for a command's options."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    domains = commands.add_parser(
        "domains",
        help="list every libvirt domain with its state, agent and disks",
        description=(
            "List every domain, active and inactive: its state, whether it is persistent, "
            "whether its guest agent is connected, and each disk with its format, source, "
            "virtual size, bytes allocated on the host, backing chain and number of "
            "internal snapshots. Changes nothing."
        ),
    )
    _add_connect(domains)
    domains.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    domains.add_argument(
        "--qemu-img",
        default=qemu_img.DEFAULT_QEMU_IMG,
        metavar="PATH",
        help="qemu-img program to read images with (default: %(default)s from PATH)",
    )
    domains.set_defaults(handler=_cmd_domains)
    return parser


def _add_connect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--connect",
        default=DEFAULT_URI,
        metavar="URI",
        help="libvirt connection URI (default: %(default)s)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        result: int = args.handler(args)
    except VirtError as exc:
        print(f"virt-reclaim: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return result


def _cmd_domains(args: argparse.Namespace) -> int:
    with Hypervisor(args.connect, read_only=True) as hypervisor:
        reports = [
            inventory.describe_domain(domain, qemu_img_path=args.qemu_img)
            for domain in hypervisor.domains()
        ]
    if args.json:
        json.dump([_jsonable(r) for r in reports], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_domain_table(reports, sys.stdout)
    return EXIT_OK


def _jsonable(report: inventory.DomainReport) -> dict[str, Any]:
    return dataclasses.asdict(report)


def print_domain_table(reports: Sequence[inventory.DomainReport], out: TextIO) -> None:
    """Print one row per disk (one per domain without disks), backing files indented below."""
    header = (
        "DOMAIN",
        "STATE",
        "PERSISTENT",
        "AGENT",
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
        domain_cols = (report.name, str(report.state), "yes" if report.persistent else "no", agent)
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
            if extra:
                notes[len(rows) - 1] = extra
            domain_cols = ("", "", "", "")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    indent = sum(widths) + 2 * len(widths)
    for index, row in enumerate((header, *rows)):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")
        for note in notes.get(index - 1, []):
            out.write(" " * indent + "└ " + note + "\n")
