"""``recover`` and ``history``: the job journal."""

from __future__ import annotations

import argparse
import json
import sys

from virt_reclaim import logs, recovery
from virt_reclaim.cli.common import EXIT_OK
from virt_reclaim.cli.render import print_history_table
from virt_reclaim.journal import Journal
from virt_reclaim.virt import Hypervisor


def cmd_recover(args: argparse.Namespace) -> int:
    """Finish or undo the jobs whose process died."""
    logs.configure(logs.LogFormat.AUTO)
    journal = Journal(args.state_dir)
    with Hypervisor(args.connect) as hypervisor:
        done = recovery.recover(journal, args.state_dir, hypervisor.domain_by_uuid)
    if args.json:
        json.dump([r.to_json() for r in done], sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif not done:
        print("nothing to recover")
    for item in done if not args.json else []:
        print(f"{item.domain}: job {item.job_id} (interrupted at {item.step}): {item.outcome}")
        for action in item.actions:
            print(f"  {action}")
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    """Show past jobs from the journal."""
    jobs = Journal(args.state_dir).history(args.domain)
    if args.json:
        json.dump([job.to_json() for job in jobs], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    print_history_table(jobs, sys.stdout)
    return EXIT_OK
