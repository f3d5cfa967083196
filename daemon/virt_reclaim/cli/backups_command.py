"""``virt-reclaim backups``: the originals kept as backups, and deleting the expired ones."""

from __future__ import annotations

import argparse
import json
import sys
import time

from virt_reclaim import backups, logs
from virt_reclaim.cli.common import EXIT_OK
from virt_reclaim.journal.store import Journal
from virt_reclaim.units import format_bytes


def cmd_backups(args: argparse.Namespace) -> int:
    """List the kept originals (domain, disk, path, bytes held, expiry); prune the expired."""
    logs.configure(logs.LogFormat.AUTO)
    journal = Journal(args.state_dir)
    pruned = backups.prune(journal) if args.prune else []
    kept = journal.backups()
    held = [backups.held_bytes(b) for b in kept]  # each file read once
    if args.json:
        listing = {
            "backups": [b.to_json(h) for b, h in zip(kept, held, strict=True)],
            "pruned": [
                {**p.record.to_json(), "action": p.action, "freed": p.freed} for p in pruned
            ],
        }
        json.dump(listing, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    for item in pruned:
        freed = f" ({format_bytes(item.freed)} freed)" if item.action == "removed" else ""
        print(f"{item.action}: {item.record.path}{freed}")
    if not kept:
        print("no backups kept")
        return EXIT_OK
    now = time.time()
    print(f"{'DOMAIN':<20} {'DISK':<6} {'HELD':>10}  {'EXPIRES':<22} PATH")
    for backup, bytes_held in zip(kept, held, strict=True):
        expiry = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(backup.expires_at))
        if backup.expires_at <= now:
            expiry = "expired"
        shown = "missing" if bytes_held is None else format_bytes(bytes_held)
        print(f"{backup.domain:<20} {backup.target:<6} {shown:>10}  {expiry:<22} {backup.path}")
    total = sum(h or 0 for h in held)
    print(f"{len(kept)} backup(s) hold {format_bytes(total)}; the space comes back at expiry")
    return EXIT_OK
