"""``check`` and ``schema``: what the configuration says, and what it may say."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import TextIO

from virt_reclaim.cli.common import EXIT_OK, EXIT_USAGE
from virt_reclaim.config import loading, paths
from virt_reclaim.config.policy import PolicyFile
from virt_reclaim.errors import VirtError
from virt_reclaim.reports.check import CheckReport, DomainToCheck, check_config
from virt_reclaim.virt.connection import Hypervisor


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the daemon configuration and policies; show each policy's window and domains."""
    loaded = loading.load(args.config_dir)
    domains: list[DomainToCheck] | None = None
    uri = args.connect or loaded.daemon.uri
    try:
        with Hypervisor(uri, read_only=True) as hypervisor:
            domains = [DomainToCheck(d.name, d.uuid, d.xml) for d in hypervisor.domains()]
    except VirtError as exc:
        print(f"virt-reclaim: cannot list domains ({exc}); the files alone were checked",
              file=sys.stderr)  # fmt: skip
    policy_dir = Path(loaded.daemon.policy_dir or Path(args.config_dir) / paths.POLICY_FOLDER)
    files = len(list(policy_dir.glob("*.toml"))) if policy_dir.is_dir() else None
    report = check_config(
        loaded, domains, datetime.datetime.now(datetime.UTC),
        policy_dir=str(policy_dir), policy_files=files,
    )  # fmt: skip
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_check(report, sys.stdout, sys.stderr)
        counts = f"{len(report.errors)} error(s) and {len(report.warnings)} warning(s)"
        if report.errors:
            print(f"virt-reclaim: {counts} in {args.config_dir}", file=sys.stderr)
        elif report.warnings:
            # Valid: no error is counted, so that "error" appears only when there is one.
            print(f"virt-reclaim: {args.config_dir} is valid, with "
                  f"{len(report.warnings)} warning(s)", file=sys.stderr)  # fmt: skip
    return EXIT_USAGE if report.errors else EXIT_OK


def print_check(report: CheckReport, out: TextIO, err: TextIO) -> None:
    """Each policy with its window and domains on ``out``; warnings then errors on ``err``."""
    for item in report.policies:
        policy = item.policy
        state = "" if policy.enabled else " (disabled)"
        names = ", ".join(item.domains or ()) or "no domain now"
        shown = names if item.domains is not None else "domains not listed"
        print(f"{policy.name}{state}  [{item.file}, priority {policy.priority}]: {shown}", file=out)
        if item.window is not None:
            zone = policy.schedule.timezone
            shown_zone = "" if item.window.start.tzname() == zone else f" ({zone})"
            print(f"  {item.window}{shown_zone}", file=out)
        for note in item.notes:
            print(f"  note: {note}", file=out)
    for warning in report.warnings:
        print(f"warning: {warning}", file=err)
    for error in report.errors:
        print(f"error: {error}", file=err)


def cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of a policy file, or with ``--daemon`` of the daemon configuration."""
    model = loading.DaemonConfig if args.daemon else PolicyFile
    # Serialization mode: defaults pass through the fields' serializers, so that they read
    # "4h" and "2GiB" as in a file, not "PT4H" and 2147483648.
    json.dump(model.model_json_schema(mode="serialization"), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return EXIT_OK
