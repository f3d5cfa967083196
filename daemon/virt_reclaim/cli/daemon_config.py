"""Options not given on the command line, taken from the daemon configuration file."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from virt_reclaim.cli.common import UsageError

if TYPE_CHECKING:
    from virt_reclaim.config import loading


def apply_daemon_config(args: argparse.Namespace) -> None:
    """Fill the options not given from CONFIG_DIR/virt-reclaim.toml (then built-in defaults)."""
    if not hasattr(args, "config_dir") or args.command in ("daemon", "reload"):
        return  # these report configuration errors their own way (a log, exit 78)
    # Imported here, not at the top: main imports this module for every command, and --help
    # or a usage error must not pay for the configuration's pydantic models.
    from virt_reclaim.config import loading  # noqa: PLC0415

    daemon_config, errors = loading.load_daemon(args.config_dir)
    if errors and not _usable_despite(errors, args):
        raise UsageError("\n  ".join(["the daemon settings are not valid:", *map(str, errors)]))
    args.daemon_config = daemon_config
    for option, value in (("connect", daemon_config.uri), ("state_dir", daemon_config.state_dir),
                          ("qemu_img", daemon_config.qemu_img)):  # fmt: skip
        if hasattr(args, option) and getattr(args, option) is None:
            setattr(args, option, value)


# What each command takes from the daemon configuration, by its option: a command not listed
# refuses to run on a configuration with errors (run would follow a configuration half read).
_NEEDS = {
    "check": {},  # reports the errors itself, with those of the policies
    "plan": {},  # prints them and exits 2
    "history": {"state_dir": "state_dir"},
    "backups": {"state_dir": "state_dir"},
    "status": {"state_dir": "state_dir"},
    "recover": {"state_dir": "state_dir", "uri": "connect"},
}


def _usable_despite(errors: list[loading.ConfigError], args: argparse.Namespace) -> bool:
    """Whether ``args.command`` can go on with the keys that are valid; say so if it does.

    ``recover`` and ``history`` need only the state folder and the URI: a wrong ``nice``
    must not keep an operator from finishing a job that died. A file that could not be read
    at all (field None) or a wrong needed key gives no value; an option given instead does.
    """
    needs = _NEEDS.get(args.command)
    if needs is None:
        return False
    missing = [
        option for key, option in needs.items()
        if getattr(args, option, None) is None
        and any(error.field is None or error.field == key for error in errors)
    ]  # fmt: skip
    if missing:
        options = " and ".join(f"--{option.replace('_', '-')}" for option in missing)
        raise UsageError("\n  ".join([f"the daemon settings are not valid (give {options} to go "
                                      "on without them):", *map(str, errors)]))  # fmt: skip
    if needs:
        lines = ["warning: the daemon settings have errors; going on with the valid ones:"]
        print("\n  ".join([*lines, *map(str, errors)]), file=sys.stderr)
    return True
