"""What a configuration error says, and where: pydantic's messages made an operator's.

pydantic says ``Extra inputs are not permitted`` for a misspelled key and ``Input
should be a valid tuple`` for ``[policy]`` written instead of ``[[policy]]``;
here they name the key and the nearest valid one, or the TOML to write. The
line of an error is found by reading the file's table headers and keys: tomllib
keeps no positions.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import ErrorDetails

# Error types whose input is not the operator's value (a missing key has none).
NO_VALUE = frozenset({"missing"})

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(
    r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*="
)
_TOML_LINE = re.compile(r"at line (\d+)")

Location = tuple[int | str, ...]


def explain(model: type[BaseModel], loc: Location, error: ErrorDetails) -> str | None:
    """A clearer message for ``error`` at ``loc`` in a ``model`` document, or None."""
    keys = [str(part) for part in loc if isinstance(part, str)]
    if error["type"] == "extra_forbidden":
        dotted = ".".join(_without_policy(loc))
        parent = _model_at(model, loc[:-1])
        valid = sorted(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        if close:
            prefix = dotted.rpartition(".")[0]
            suggestion = f"{prefix}.{close[0]}" if prefix else close[0]
            return f"unknown key `{dotted}`; did you mean `{suggestion}`?"
        return f"unknown key `{dotted}`; valid keys here: {', '.join(valid)}"
    if keys == ["policy"] and len(loc) == 1 and isinstance(error.get("input"), dict):
        return (
            "[policy] is a single table; write [[policy]] (an array of tables), once before "
            "each policy"
        )
    return None


def _without_policy(loc: Location) -> list[str]:
    """The dotted path inside one policy: ``policy`` and its index left out."""
    parts = list(loc)
    if len(parts) >= 2 and parts[0] == "policy" and isinstance(parts[1], int):
        parts = parts[2:]
    return [str(part) for part in parts]


def _model_at(model: type[BaseModel], loc: Location) -> type[BaseModel] | None:
    """The model class that holds the keys at ``loc`` (list indexes skipped)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        if current is None or part not in current.model_fields:
            return None
        current = _model_in(current.model_fields[part].annotation)
    return current


def _model_in(annotation: Any) -> type[BaseModel] | None:  # noqa: ANN401 - any annotation
    """The model class inside an annotation (``X``, ``X | None``, ``tuple[X, ...]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def toml_error_line(exc: Exception) -> int | None:
    """The line tomllib names in its message ("... (at line 3, column 7)")."""
    match = _TOML_LINE.search(str(exc))
    return int(match.group(1)) if match else None


def key_lines(file: str) -> dict[Location, int]:
    """The first line of each key and table of a TOML file, by its path (array items indexed).

    A reader of lines, not of TOML: enough for the files people write (headers, dotted
    keys, inline tables on one line). Values spread over lines are skipped, not parsed.
    """
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    lines: dict[Location, int] = {}
    counts: dict[tuple[str, ...], int] = {}
    table: list[int | str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            parts = _split_key(header.group(2))
            if header.group(1) == "[[":
                array = tuple(parts)
                index = counts.get(array, 0)
                counts[array] = index + 1
                table = [*_resolve(parts[:-1], counts), parts[-1], index]
            else:
                table = _resolve(parts, counts)
            _record(lines, table, number)
            continue
        key = _KEY.match(line)
        if key:
            _record(lines, [*table, *_split_key(key.group(1))], number)
    return lines


def _split_key(text: str) -> list[str]:
    return [part.strip().strip("\"'") for part in text.split(".")]


def _resolve(parts: list[str], counts: dict[tuple[str, ...], int]) -> list[int | str]:
    """A table path with the index of the latest item of each array of tables in it."""
    path: list[int | str] = []
    for i, part in enumerate(parts):
        path.append(part)
        index = counts.get(tuple(parts[: i + 1]))
        if index:
            path.append(index - 1)
    return path


def _record(lines: dict[Location, int], path: list[int | str], number: int) -> None:
    for end in range(1, len(path) + 1):
        lines.setdefault(tuple(path[:end]), number)


def line_of(lines: dict[Location, int], loc: Location) -> int | None:
    """The line of ``loc``, else of its nearest enclosing key or table."""
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None
