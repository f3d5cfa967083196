"""virt-reclaim(1), in roff (the man macros), from the command line's records."""

from __future__ import annotations

from virt_reclaim import __version__
from virt_reclaim.config.paths import DAEMON_FILE, DEFAULT_CONFIG_DIR, POLICY_FOLDER
from virt_reclaim.journal.store import DEFAULT_STATE_DIR, JOURNAL_NAME
from virt_reclaim.model import DEFAULT_URI
from virt_reclaim.shelldocs.commands import Command, Option, Program, read_program


def render(program: Program | None = None) -> str:
    """The man page of ``program`` (default: virt-reclaim's), one string ending in a newline."""
    program = program or read_program()
    prog = program.prog
    lines = [
        f".\\\" Generated from {prog}'s argument parser (python -m virt_reclaim.shelldocs).",
        f'.TH {prog.upper()} 1 "" "{prog} {__version__}" "User Commands"',
        ".SH NAME",
        f"{prog} \\- reclaim the free space of idle KVM guests' qcow2 disks",
        ".SH SYNOPSIS",
        f".B {prog}",
        "[\\fB\\-\\-version\\fR] [\\fB\\-h\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
    ]
    for command in program.commands:
        lines += [".br", f".B {prog} {command.name}", _synopsis_arguments(command)]
    lines += [".SH DESCRIPTION", _text(program.top.description)]
    lines += [".SH OPTIONS", *_options(program.top)]
    lines += [".SH COMMANDS"]
    for command in program.commands:
        lines += [f".SS {command.name}", _text(command.summary[:1].upper() + command.summary[1:])]
        if command.description:
            lines += [".PP", _text(command.description)]
        lines += _positionals(command)
        lines += _options(command)
        if command.epilog:
            lines += [".PP", _text(command.epilog)]
    lines += [".SH EXIT STATUS", _text(program.top.exit_status or ""), ".PP",
              _text("Each command's own:")]  # fmt: skip
    for command in program.commands:
        if command.exit_status:
            lines += [".TP", f".B {command.name}", _text(command.exit_status)]
    lines += [
        ".SH ENVIRONMENT",
        ".TP",
        ".B LIBVIRT_DEFAULT_URI",
        _text(f"The libvirt URI when neither --connect nor uri in {DAEMON_FILE} names one "
              f"(else {DEFAULT_URI}), as virsh takes it."),
        ".SH FILES",
        ".TP",
        f".I {DEFAULT_CONFIG_DIR}/{DAEMON_FILE}",
        _text("The daemon's settings (optional; every key has a default). "
              f"{prog} schema --daemon prints their JSON Schema."),
        ".TP",
        f".I {DEFAULT_CONFIG_DIR}/{POLICY_FOLDER}/*.toml",
        _text(f"The policies: which domains, when, how. {prog} schema prints their JSON Schema; "
              f"{prog} check validates both."),
        ".TP",
        f".I {DEFAULT_STATE_DIR}/{JOURNAL_NAME}",
        _text("The job journal (SQLite), read by history, recover and backups."),
        ".SH SEE ALSO",
        ".BR virsh (1),",
        ".BR qemu-img (1),",
        ".BR systemctl (1)",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _synopsis_arguments(command: Command) -> str:
    words = [f"[\\fI{p.metavar}\\fR]" if p.optional else f"\\fI{p.metavar}\\fR"
             for p in command.positionals]  # fmt: skip
    return " ".join(["[\\fIOPTIONS\\fR]", *words])


def _positionals(command: Command) -> list[str]:
    lines = []
    for positional in command.positionals:
        lines += [".TP", f".I {positional.metavar}", _text(positional.help)]
    return lines


def _options(command: Command) -> list[str]:
    lines = []
    for option in command.options:
        lines += [".TP", _option_head(option), _text(option.help)]
    return lines


def _option_head(option: Option) -> str:
    flags = ", ".join(f"\\fB{_escape(flag)}\\fR" for flag in option.flags)
    if option.metavar is None:
        return flags
    if option.choices:
        return f"{flags} {{{'|'.join(_escape(c) for c in option.choices)}}}"
    return f"{flags} \\fI{_escape(option.metavar)}\\fR"


def _text(text: str) -> str:
    """A paragraph of plain text as roff: escaped, and never read as a request."""
    escaped = _escape(text)
    if escaped.startswith((".", "'")):
        escaped = "\\&" + escaped
    return escaped


def _escape(text: str) -> str:
    out = text.replace("\\", "\\e").replace("-", "\\-")
    # A character beyond ASCII by its name: groff reads the file as Latin-1 without preconv.
    return "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in out)
