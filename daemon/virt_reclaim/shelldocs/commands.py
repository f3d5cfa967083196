"""The command line as records, read from the parser: what the man page and completions show.

Both are generated from ``build_parser()``, so that a new option is documented and completed
the moment it exists; nothing here is written by hand twice.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any

from virt_reclaim.cli.parsing import build_parser

# A metavar that names a folder or a file: completed with the shell's own folder or file names.
FOLDER_METAVARS = frozenset({"DIR"})
FILE_METAVARS = frozenset({"PATH"})
_EXIT_STATUS = re.compile(r"Exit status: (.*?\.)(?=\s|$)")


@dataclass(frozen=True)
class Option:
    """An option: its flags, the value it takes (None for a switch), and its help."""

    flags: tuple[str, ...]
    metavar: str | None
    choices: tuple[str, ...]
    help: str
    repeatable: bool = False

    @property
    def value_kind(self) -> str:
        """What its value is, for completion: none, choice, folder, file or text."""
        if self.metavar is None:
            return "none"
        if self.choices:
            return "choice"
        if self.metavar in FOLDER_METAVARS:
            return "folder"
        if self.metavar in FILE_METAVARS:
            return "file"
        return "text"


@dataclass(frozen=True)
class Positional:
    """A positional argument: its name as usage shows it, whether it may be left out, its help."""

    metavar: str
    optional: bool
    help: str


@dataclass(frozen=True)
class Command:
    """A subcommand (or the program itself, named "")."""

    name: str
    summary: str
    description: str
    epilog: str
    options: tuple[Option, ...]
    positionals: tuple[Positional, ...]

    @property
    def exit_status(self) -> str | None:
        """The "Exit status: ..." sentence of its epilog, without those words, if it has one."""
        found = _EXIT_STATUS.search(self.epilog)
        return found.group(1) if found else None

    @property
    def flags(self) -> tuple[str, ...]:
        """Every option string it accepts, in the parser's order."""
        return tuple(flag for option in self.options for flag in option.flags)


@dataclass(frozen=True)
class Program:
    """The whole command line: its own options and every subcommand."""

    prog: str
    top: Command
    commands: tuple[Command, ...]


def read_program(parser: argparse.ArgumentParser | None = None) -> Program:
    """The command line of ``parser`` (default: virt-reclaim's own) as records."""
    parser = parser or build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {action.dest: _help(action, parser.prog) for action in sub._choices_actions}
    commands = tuple(
        _command(name, summaries.get(name, ""), child) for name, child in sub.choices.items()
    )
    return Program(parser.prog, _command("", "", parser), commands)


def _command(name: str, summary: str, parser: argparse.ArgumentParser) -> Command:
    options: list[Option] = []
    positionals: list[Positional] = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            options.append(_option(action, parser.prog))
        else:
            positionals.append(
                Positional(
                    metavar=str(action.metavar or action.dest.upper()),
                    optional=action.nargs in ("?", "*"),
                    help=_help(action, parser.prog),
                )
            )
    return Command(
        name=name,
        summary=summary,
        description=parser.description or "",
        epilog=parser.epilog or "",
        options=tuple(options),
        positionals=tuple(positionals),
    )


def _option(action: argparse.Action, prog: str) -> Option:
    takes_value = action.nargs != 0
    metavar = None
    if takes_value:
        metavar = str(action.metavar or action.dest.upper())
    return Option(
        flags=tuple(action.option_strings),
        metavar=metavar,
        choices=tuple(str(c) for c in action.choices or ()),
        help=_help(action, prog),
        repeatable=isinstance(action, argparse._AppendAction),
    )


def _help(action: argparse.Action, prog: str) -> str:
    """The help text as ``--help`` prints it: ``%(default)s`` and ``%%`` expanded."""
    if not action.help:
        return ""
    # argparse's own expansion (HelpFormatter._expand_help), without a formatter's wrapping.
    params: dict[str, Any] = dict(vars(action), prog=prog)
    for key, value in list(params.items()):
        if value is argparse.SUPPRESS:
            del params[key]
        elif hasattr(value, "__name__"):
            params[key] = value.__name__
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return " ".join((action.help % params).split())
