"""What the commands' parsers share: the handler each names, and the options several take."""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass

from virt_reclaim.config.paths import DEFAULT_CONFIG_DIR
from virt_reclaim.journal.store import DEFAULT_STATE_DIR
from virt_reclaim.model import DEFAULT_URI


@dataclass(frozen=True)
class Handler:
    """A command's handler, imported only when that command runs.

    Each command imports what it needs (libvirt, pydantic, the scheduler, the metrics): naming
    the handlers instead of importing them keeps that cost off the commands that do not.
    """

    module: str
    function: str

    def __call__(self, args: argparse.Namespace) -> int:
        """Run the command; its exit status."""
        result: int = getattr(importlib.import_module(self.module), self.function)(args)
        return result


def add_config_dir(parser: argparse.ArgumentParser) -> None:
    """Add ``--config-dir``: the configuration folder."""
    parser.add_argument(
        "--config-dir", default=DEFAULT_CONFIG_DIR, metavar="DIR",
        help="the configuration folder (default: %(default)s)",
    )  # fmt: skip


def add_state_dir(parser: argparse.ArgumentParser) -> None:
    """Add ``--state-dir``: where the job journal lives."""
    parser.add_argument(
        "--state-dir", metavar="DIR",
        help="where the job journal lives (default: the configured state_dir, else "
        f"{DEFAULT_STATE_DIR})",
    )  # fmt: skip


def add_connect(parser: argparse.ArgumentParser) -> None:
    """Add ``-c``/``--connect``: the libvirt connection URI."""
    parser.add_argument(
        "-c",
        "--connect",
        metavar="URI",
        help="libvirt connection URI (default: the configured uri, else $LIBVIRT_DEFAULT_URI, "
        f"else {DEFAULT_URI})",
    )
