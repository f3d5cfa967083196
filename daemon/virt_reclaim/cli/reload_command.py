"""``virt-reclaim reload``: validate, signal the daemon, and wait for its verdict.

systemd runs it as the unit's ``ExecReload=``, so that ``systemctl reload`` fails when the
daemon keeps its last good configuration; ``kill -HUP`` alone always succeeds.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Mapping

from virt_reclaim.cli.common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, UsageError
from virt_reclaim.config import loading
from virt_reclaim.service.reloads import ReloadRecord, Verdict, read_record, record_path

POLL_S = 0.1


def cmd_reload(args: argparse.Namespace) -> int:
    """Validate the configuration, send SIGHUP to the daemon, and report what it did."""
    pid = daemon_pid(args.pid, os.environ)
    loaded = loading.load(args.config_dir)
    if loaded.errors:
        print(f"virt-reclaim: {len(loaded.errors)} error(s) in the configuration; the "
              f"daemon (pid {pid}) was not asked to reload and keeps its own:",
              file=sys.stderr)  # fmt: skip
        for error in loaded.errors:
            print(f"  {error}", file=sys.stderr)
        return EXIT_CONFIG
    state_dir = args.state_dir or loaded.daemon.state_dir
    before = read_record(state_dir)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"virt-reclaim: cannot signal the daemon (pid {pid}): {exc.strerror}",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    answer = wait_for_verdict(state_dir, pid, before, args.timeout)
    if answer is None:
        print(f"virt-reclaim: the daemon (pid {pid}) did not answer within {args.timeout:g} s "
              f"(in {record_path(state_dir)}); see journalctl -u virt-reclaim",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    if answer.verdict is Verdict.APPLIED:
        print(f"the daemon (pid {pid}) applied the configuration of {args.config_dir}")
        return EXIT_OK
    print(f"virt-reclaim: the daemon (pid {pid}) rejected the configuration ({answer.errors} "
          "error(s), see journalctl -u virt-reclaim) and runs on the last good one",
          file=sys.stderr)  # fmt: skip
    return EXIT_FAILED


def daemon_pid(option: int | None, environ: Mapping[str, str]) -> int:
    """The daemon's pid: ``--pid``, else $MAINPID (set by systemd for ExecReload=)."""
    if option is not None:
        return option
    value = environ.get("MAINPID", "")
    if not value.isdigit() or int(value) <= 0:
        raise UsageError("which daemon? give --pid PID (systemd sets $MAINPID for ExecReload=)")
    return int(value)


def wait_for_verdict(
    state_dir: str, pid: int, before: ReloadRecord | None, timeout: float
) -> ReloadRecord | None:
    """The record of ``pid``'s next reload after ``before``, or None if none comes in time."""
    deadline = time.monotonic() + timeout
    while True:
        record = read_record(state_dir)
        if record is not None and record.follows(before, pid):
            return record
        if time.monotonic() >= deadline or not _alive(pid):
            return None
        time.sleep(POLL_S)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
