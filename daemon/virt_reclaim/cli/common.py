"""What every command shares: exit statuses and the error of a wrong command line."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SKIPPED = 3
# sysexits.h EX_CONFIG, as the daemon's at start: the configuration has errors.
EXIT_CONFIG = 78


class UsageError(Exception):
    """The command line names something that does not exist or is not valid."""
