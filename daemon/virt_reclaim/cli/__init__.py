"""The ``virt-reclaim`` command line: subcommands, output formats and exit statuses.

``parsing`` builds the parser, ``render`` prints for a person, and each command has its handler in
``run``, ``domains``, ``config_commands`` (check, schema), ``plan_command``, ``recover_command``,
``history_command``, ``backups_command``, ``daemon_command`` and ``reload_command``. Only the
handler of the command given is imported, so that each command pays only for what it uses.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from virt_reclaim.cli.common import EXIT_FAILED, EXIT_USAGE, Terminated, UsageError
from virt_reclaim.cli.daemon_config import apply_daemon_config
from virt_reclaim.cli.parsing import build_parser
from virt_reclaim.errors import VirtError
from virt_reclaim.job.lock import DomainBusy
from virt_reclaim.journal.records import JournalError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        apply_daemon_config(args)
        result: int = args.handler(args)
    except UsageError as exc:
        print(f"virt-reclaim: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (VirtError, JournalError, DomainBusy) as exc:
        print(f"virt-reclaim: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Terminated:
        print("virt-reclaim: terminated (SIGTERM); the job restored what it had changed",
              file=sys.stderr)  # fmt: skip
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        return 130
    return result
