"""``virt-reclaim plan``: what would be reclaimed, when, and why not."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys

from virt_reclaim import logs
from virt_reclaim.cli.common import EXIT_OK, EXIT_USAGE
from virt_reclaim.cli.render import print_plan
from virt_reclaim.config import loading
from virt_reclaim.reports import plan
from virt_reclaim.virt.connection import Hypervisor


def cmd_plan(args: argparse.Namespace) -> int:
    """Show for every domain what would be reclaimed, when, and why not."""
    logs.configure(logs.LogFormat.AUTO, level=logging.WARNING)
    loaded = loading.load(args.config_dir)
    for error in loaded.errors:
        print(f"error: {error}", file=sys.stderr)
    policies = [policy for _file, policy in loaded.policies]
    # Read-write, though plan only reads: libvirt refuses agent queries on read-only connections.
    with Hypervisor(args.connect or loaded.daemon.uri) as hypervisor:
        entries = plan.plan(
            hypervisor, policies, qemu_img=loaded.daemon.qemu_img,
            now=datetime.datetime.now(datetime.UTC),
        )  # fmt: skip
    if args.json:
        json.dump([e.to_json() for e in entries], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_plan(entries, sys.stdout)
    return EXIT_USAGE if loaded.errors else EXIT_OK
