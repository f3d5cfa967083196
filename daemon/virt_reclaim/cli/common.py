"""What every command shares: exit statuses, the error of a wrong command line, SIGTERM's."""

from __future__ import annotations

from virt_reclaim.errors import VirtReclaimError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SKIPPED = 3
# sysexits.h EX_CONFIG, as the daemon's at start: the configuration has errors.
EXIT_CONFIG = 78


class UsageError(VirtReclaimError):
    """The command line names something that does not exist or is not valid."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; raised where Ctrl-C would be, so that the job restores first."""
