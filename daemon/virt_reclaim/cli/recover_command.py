"""``virt-reclaim recover``: finish or undo the jobs whose process died."""

from __future__ import annotations

import argparse
import json
import sys

from virt_reclaim import logs
from virt_reclaim.cli.common import EXIT_FAILED, EXIT_OK
from virt_reclaim.job.results import RecoveryOutcome
from virt_reclaim.journal import recovery
from virt_reclaim.journal.store import Journal
from virt_reclaim.virt.connection import Hypervisor


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
        for disk in item.found:
            print(f"  {disk.target}: found {' -> '.join(map(str, disk.live_chain))}"
                  + (f", a {disk.block_job} block job" if disk.block_job else "")
                  + (f", files {', '.join(disk.files)}" if disk.files else ""))  # fmt: skip
        for action in item.actions:
            print(f"  {action}")
    # An operator's script must see that something is left to do.
    return (
        EXIT_FAILED if any(item.outcome is RecoveryOutcome.UNFINISHED for item in done) else EXIT_OK
    )
