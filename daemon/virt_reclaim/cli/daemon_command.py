"""``virt-reclaim daemon``: run the service."""

from __future__ import annotations

import argparse

from virt_reclaim.service import daemon


def cmd_daemon(args: argparse.Namespace) -> int:
    """Run the service until a signal stops it."""
    return daemon.Daemon(args.config_dir).run()
