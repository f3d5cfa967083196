"""What starting the command line imports: each command only what it uses.

The suite and operators' scripts start ``virt-reclaim`` hundreds of times; importing libvirt,
the daemon's scheduler or the metrics for ``--help`` or ``history`` cost about a second of CPU
each time. These tests guard that without timing anything: a fresh interpreter runs the
command, then reports which of the heavy modules it imported.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from virt_reclaim.cli.parsing import build_parser
from virt_reclaim.cli.parsing.shared import Handler

# What only some commands need; none of it is needed to parse a command line.
HEAVY = (
    "libvirt",
    "apscheduler",
    "asyncio",
    "prometheus_client",
    "pydantic",
    "structlog",
    "virt_reclaim.service.daemon",
    "virt_reclaim.config.policy",
    "virt_reclaim.reports.plan",
    "virt_reclaim.virt.connection",
)

# What history and backups, which read the journal and the daemon settings, never need.
NOT_FOR_THE_JOURNAL = (
    "libvirt",
    "virt_reclaim.virt.connection",
    "prometheus_client",
    "virt_reclaim.service.daemon",
    "virt_reclaim.reports.plan",
    "virt_reclaim.config.policy",
    "apscheduler",
)


def imported_by(code: str) -> set[str]:
    """The modules of HEAVY that a fresh interpreter has imported after running ``code``."""
    probe = textwrap.dedent(code) + textwrap.dedent(f"""
        import json, sys
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.__stdout__)
    """)
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    found: list[str] = json.loads(done.stdout.splitlines()[-1])
    return set(found)


def run_main(*argv: str) -> str:
    """Code that runs the command line's ``main`` with ``argv``, its output hidden."""
    return f"""
        import contextlib, io
        from virt_reclaim.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                status = main({list(argv)!r})
            except SystemExit as exc:
                status = exc.code
        assert status == 0, status
    """


def parse(*argvs: list[str]) -> str:
    """Code that builds the parser and parses each of ``argvs``."""
    return f"""
        from virt_reclaim.cli.parsing import build_parser
        parser = build_parser()
        for argv in {list(argvs)!r}:
            parser.parse_args(argv)
    """


def test_parsing_any_command_imports_none_of_the_heavy_modules() -> None:
    assert imported_by(parse(
        ["history", "--json", "--since", "7d", "--outcome", "failed"], ["backups", "--prune"],
        ["recover"], ["check"], ["plan"], ["daemon"], ["reload", "--pid", "1"],
        ["run", "vm", "--keep-backup", "2d", "--free-space", "zero", "--log-format", "json"],
    )) == set()  # fmt: skip
    # A size is read with pydantic's ByteSize, imported for that alone.
    assert imported_by(parse(["run", "vm", "--rate-limit", "50MiB"])) == {"pydantic"}


@pytest.mark.parametrize("command", ["", "run", "recover", "history", "check", "daemon"])
def test_help_imports_none_of_the_heavy_modules(command: str) -> None:
    assert imported_by(run_main(*command.split(), "--help")) == set()


def test_history_and_backups_import_neither_libvirt_nor_the_daemon(tmp_path: Path) -> None:
    folders = ["--state-dir", str(tmp_path / "state"), "--config-dir", str(tmp_path)]
    history = imported_by(run_main("history", "--json", *folders))
    backups = imported_by(run_main("backups", "--json", *folders))
    assert history.isdisjoint(NOT_FOR_THE_JOURNAL)
    assert backups.isdisjoint(NOT_FOR_THE_JOURNAL)
    # history logs nothing; backups logs what it deletes (structlog, which imports asyncio).
    assert history.isdisjoint({"structlog", "asyncio"})
    assert "pydantic" in history  # the daemon settings were read, as before


def test_every_command_names_a_handler_that_exists() -> None:
    subcommands = next(
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    for name, parser in subcommands.choices.items():
        handler = parser.get_default("handler")
        assert isinstance(handler, Handler), name
        function = getattr(importlib.import_module(handler.module), handler.function)
        assert callable(function), name


def test_check_imports_neither_the_daemon_nor_the_planner(tmp_path: Path) -> None:
    (tmp_path / "policies.d").mkdir()
    found = imported_by(f"""
        import contextlib, io
        from virt_reclaim.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["check", "--config-dir", {str(tmp_path)!r},
                         "--connect", "test:///default", "--json"]) == 0
    """)
    assert found.isdisjoint({"prometheus_client", "virt_reclaim.service.daemon",
                             "virt_reclaim.reports.plan"})  # fmt: skip
    assert {"libvirt", "virt_reclaim.config.policy"} <= found  # what check does need
