"""The man page and the completions, generated from the parser: complete, and read by real tools.

The files are generated at install time (README, "Installing on a host") rather than kept in
the repository, so there is no copy to go stale: these tests check that what the generator
writes covers every subcommand and option the parser has, and that groff, bash and zsh take it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from virt_reclaim.cli.parsing import build_parser
from virt_reclaim.shelldocs import BASH_COMPLETION, MAN_PAGE, ZSH_COMPLETION, write_all
from virt_reclaim.shelldocs.commands import read_program

ROOT = Path(__file__).resolve().parents[3]


def needs(tool: str) -> str:
    """The path of ``tool``; skipped without it (setup.sh installs it), failed in CI."""
    path = shutil.which(tool)
    if path is None:
        why = f"{tool} is missing: 'bash scripts/setup.sh --venv-only' installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shelldocs")
    write_all(folder)
    return folder


def plain(rendered: str) -> str:
    """Rendered roff as read on a screen: no overstrike (bold, underline), ASCII dashes."""
    text = re.sub(".\b", "", rendered)
    return text.replace("\u2010", "-").replace("\u2212", "-")


def complete(docs: Path, *words: str) -> list[str]:
    """What the bash completion offers for ``words`` (the last one being completed)."""
    script = (
        'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); '
        '_virt_reclaim; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    done = subprocess.run(
        ["bash", "-c", script, "bash", str(docs / BASH_COMPLETION), *words],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert done.stderr == ""
    return [line for line in done.stdout.splitlines() if line]


def test_the_records_hold_every_subcommand_and_option_of_the_parser() -> None:
    parser = build_parser()
    program = read_program(parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert [c.name for c in program.commands] == list(sub.choices)
    for command in program.commands:
        child = sub.choices[command.name]
        wanted = {flag for action in child._actions for flag in action.option_strings}
        assert set(command.flags) == wanted, command.name
    run = next(c for c in program.commands if c.name == "run")
    assert run.exit_status is not None and run.exit_status.startswith("0 reclaimed")
    history = next(c for c in program.commands if c.name == "history")
    limit = next(o for o in history.options if "--limit" in o.flags)
    assert "default: 1000" in limit.help  # %(default)s expanded as --help shows it


def test_the_man_page_names_every_subcommand_option_and_exit_status(docs: Path) -> None:
    page = (docs / MAN_PAGE).read_text()
    text = page.replace("\\-", "-").replace("\\fB", "").replace("\\fR", "").replace("\\fI", "")
    program = read_program()
    for command in program.commands:
        assert f".SS {command.name}\n" in page
        for flag in command.flags:
            assert flag in text, (command.name, flag)
        if command.exit_status:
            assert command.exit_status in text.replace("\n", " "), command.name
    assert ".SH EXIT STATUS" in page and "78 configuration errors at start" in text


def test_the_man_page_renders_without_a_warning(docs: Path) -> None:
    groff = needs("groff")
    done = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", str(docs / MAN_PAGE)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert done.stderr == ""
    shown_text = plain(done.stdout)
    assert "virt-reclaim reload [OPTIONS]" in shown_text
    assert "--on-shutdown-timeout" in shown_text
    man = needs("man")
    shown = subprocess.run(
        [man, "--warnings", "-l", str(docs / MAN_PAGE)],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "100"},
    )  # fmt: skip
    assert shown.stderr == ""
    assert "EXIT STATUS" in plain(shown.stdout)


def test_bash_completes_subcommands_options_and_their_values(docs: Path) -> None:
    needs("bash")
    assert complete(docs, "virt-reclaim", "hi") == ["history"]
    assert set(complete(docs, "virt-reclaim", "")) >= {"run", "check", "schema", "--version"}
    run = next(c for c in read_program().commands if c.name == "run")
    offered = complete(docs, "virt-reclaim", "run", "--")
    assert set(offered) == {flag for flag in run.flags if flag.startswith("--")}
    assert "--dry-run" in offered and "--check" not in offered
    assert complete(docs, "virt-reclaim", "run", "--free-space", "") == [
        "auto", "trim", "zero", "none"
    ]  # fmt: skip
    assert complete(docs, "virt-reclaim", "history", "--out") == ["--outcome"]
    # A value with nothing to offer offers nothing, not the option names.
    assert complete(docs, "virt-reclaim", "run", "--rate-limit", "-") == []
    assert complete(docs, "virt-reclaim", "check", "--config-dir", str(ROOT / "con")) == [
        str(ROOT / "config")
    ]  # fmt: skip


def test_the_zsh_completion_parses(docs: Path) -> None:
    zsh = needs("zsh")
    subprocess.run([zsh, "-n", str(docs / ZSH_COMPLETION)], check=True, timeout=30)
    text = (docs / ZSH_COMPLETION).read_text()
    assert text.startswith("#compdef virt-reclaim\n")
    for command in read_program().commands:
        assert f"                {command.name})\n" in text


def test_the_module_writes_the_three_files_where_it_is_told(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "virt_reclaim.shelldocs", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    names = {Path(line).name for line in done.stdout.splitlines()}
    assert names == {MAN_PAGE, BASH_COMPLETION, ZSH_COMPLETION}
    assert (tmp_path / "out" / MAN_PAGE).read_text().startswith('.\\" Generated')
