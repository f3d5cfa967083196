"""Every event the code logs is named ``noun.verb`` and documented in README.md's event tables.

The events are found with ``ast`` in the package's source, not by running it:
``log.info("x.y", ...)`` and the other levels, on any logger expression (``log``,
``self.log``, ``self._log``, ``structlog.get_logger(...)``, ``….bind(...)``),
``getattr(self.log, level)("x.y", ...)``, and a name bound to a logger's method
(``emit = log.warning if slow else log.info; emit("x.y", ...)``).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "daemon" / "virt_reclaim"
README = ROOT / "README.md"

LEVELS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "msg"})
# Lowercase words (underscores inside a word allowed) joined by single dots.
EVENT_NAME = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*(?:\.[a-z][a-z0-9]*(?:_[a-z0-9]+)*)+")
# A README table whose first column is "event": its rows name events in backticks.
TABLE_HEADER = re.compile(r"^\|\s*event\s*\|")


@dataclass(frozen=True)
class Logged:
    """One log call: the event name (None if not a literal), where, and its keyword fields."""

    event: str | None
    where: str
    fields: tuple[str, ...]


def _is_logger(node: ast.expr) -> bool:
    """True for an expression that evaluates to a structlog logger, by its look."""
    if isinstance(node, ast.Name):
        return "log" in node.id.lower()
    if isinstance(node, ast.Attribute):
        return "log" in node.attr.lower()
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr in {"get_logger", "getLogger"}:
            return True
        if node.func.attr in {"bind", "new", "opt"}:
            return _is_logger(node.func.value)
    return False


def _is_level_method(node: ast.expr) -> bool:
    """``log.info`` and the like, or a conditional choosing between them."""
    if isinstance(node, ast.IfExp):
        return _is_level_method(node.body) and _is_level_method(node.orelse)
    return isinstance(node, ast.Attribute) and node.attr in LEVELS and _is_logger(node.value)


def _emitters(tree: ast.AST) -> set[str]:
    """Names a module binds to a logger's level method (``emit = log.warning``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and _is_level_method(node.value):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _is_log_call(call: ast.Call, emitters: set[str]) -> bool:
    func = call.func
    if _is_level_method(func):
        return True
    if isinstance(func, ast.Name):
        return func.id in emitters
    # getattr(self.log, level)(...)
    return (
        isinstance(func, ast.Call)
        and isinstance(func.func, ast.Name)
        and func.func.id == "getattr"
        and bool(func.args)
        and _is_logger(func.args[0])
    )


def logged_events(package: Path = PACKAGE) -> Iterator[Logged]:
    """Every log call in the package's modules (sub-packages included)."""
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        emitters = _emitters(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not _is_log_call(node, emitters):
                continue
            first = node.args[0] if node.args else None
            event = (
                first.value
                if isinstance(first, ast.Constant) and isinstance(first.value, str)
                else None
            )
            fields = tuple(k.arg for k in node.keywords if k.arg is not None)
            yield Logged(event, f"{path.relative_to(ROOT)}:{node.lineno}", fields)


def documented_events(readme: Path = README) -> set[str]:
    """The event names in the first column of README.md's event tables."""
    names: set[str] = set()
    in_table = False
    for line in readme.read_text().splitlines():
        if TABLE_HEADER.match(line):
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        if in_table:
            first_cell = line.split("|")[1]
            names |= set(re.findall(r"`([^`]+)`", first_cell))
    return names


LOGGED = list(logged_events())


def test_the_finder_sees_every_kind_of_log_call() -> None:
    # One of each form the code uses today; if one goes away, pick another of its kind.
    events = {e.event for e in LOGGED}
    assert "daemon.started" in events  # log.info(...) on a module-level logger
    assert "job.finished" in events  # getattr(self.log, level)(...)
    assert "stats.sampled" in events  # emit = log.warning if ... else log.info
    assert "sdnotify.failed" in events  # structlog.get_logger(...).warning(...)
    assert "free_space.watch_tripped" in events  # self._log.warning(...)
    assert "recovery.done" in events  # log = log.bind(...); log.info(...)
    assert len(LOGGED) > 50


def test_every_event_is_named_by_a_literal() -> None:
    dynamic = [e.where for e in LOGGED if e.event is None]
    assert not dynamic, f"log calls must name their event with a string literal: {dynamic}"


@pytest.mark.parametrize("event", sorted({e.event for e in LOGGED if e.event}))
def test_event_is_noun_dot_verb(event: str) -> None:
    assert EVENT_NAME.fullmatch(event), event


def test_every_logged_event_is_in_the_readme() -> None:
    documented = documented_events()
    missing = sorted({f"{e.event} ({e.where})" for e in LOGGED if e.event not in documented})
    assert not missing, f"not in an event table of README.md: {missing}"


def test_the_readme_documents_no_event_the_code_does_not_log() -> None:
    logged = {e.event for e in LOGGED}
    stale = sorted(documented_events() - logged)
    assert not stale, f"README.md documents events nothing logs: {stale}"


def test_the_readme_tables_are_found() -> None:
    documented = documented_events()
    assert {"job.finished", "daemon.started", "window.closed"} <= documented
