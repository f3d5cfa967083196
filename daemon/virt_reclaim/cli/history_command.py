"""``virt-reclaim history``: past jobs from the journal."""

from __future__ import annotations

import argparse
import json
import sys

from virt_reclaim.cli.common import EXIT_OK
from virt_reclaim.cli.render import print_history_table
from virt_reclaim.journal.store import Journal


def cmd_history(args: argparse.Namespace) -> int:
    """Show past jobs from the journal."""
    outcomes = [outcome for given in args.outcome or [] for outcome in given]
    jobs = Journal(args.state_dir).history(
        args.domain, args.limit, since=args.since, outcomes=outcomes
    )
    if args.json:
        json.dump([job.to_json() for job in jobs], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    print_history_table(jobs, sys.stdout)
    return EXIT_OK
