"""The value types of the configuration files: durations, sizes, and the strict model base.

Shared by the policy files (``policy``), their hooks (``hooks``) and the daemon's
settings (``loading``): a duration or a size is written, read and described in the
JSON Schema the same way everywhere.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    PlainSerializer,
    WithJsonSchema,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> Any:  # noqa: ANN401 - pydantic passes any input
    """Read "30s", "15m", "2h", "7d" (or a number of seconds) as a timedelta."""
    if isinstance(value, bool):
        raise ValueError("a duration like 30s, 15m, 2h or 7d, not a boolean")
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError("a duration like 30s, 15m, 2h or 7d")
        return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    return value


def format_duration(value: timedelta) -> str:
    """Write a duration the way a policy file does: the largest unit that keeps it whole."""
    seconds = int(value.total_seconds())
    for unit in ("d", "h", "m"):
        if seconds and seconds % _UNIT_SECONDS[unit] == 0:
            return f"{seconds // _UNIT_SECONDS[unit]}{unit}"
    return f"{seconds}s"


# The schema says what check accepts: not JSON Schema's "duration" format (ISO 8601,
# "PT4H"), which parse_duration refuses. Defaults come out through the serializer.
Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {"type": "string", "pattern": _DURATION.pattern, "examples": ["15m", "2h", "7d"]}
    ),
]

_SIZE = re.compile(r"^\s*\d+(?:\.\d+)?\s*(?:[KMGTPE]i?B|[KMGTPE]|B)?\s*$", re.IGNORECASE)
_BINARY = (("EiB", 1024**6), ("PiB", 1024**5), ("TiB", 1024**4), ("GiB", 1024**3),
           ("MiB", 1024**2), ("KiB", 1024))  # fmt: skip


def parse_size(value: Any) -> Any:  # noqa: ANN401 - pydantic passes any input
    """Refuse what ByteSize would read only in part: it ignores trailing text ("10 GB please")."""
    if isinstance(value, bool):
        raise ValueError("a size like 512MiB or 2GiB, not a boolean")
    if isinstance(value, str) and not _SIZE.match(value):
        raise ValueError("a size like 512MiB, 2GiB or 500MB (a number and one unit, nothing else)")
    return value


def format_size(value: int) -> str:
    """Write a size the way a policy file does: the largest binary unit that keeps it whole."""
    for unit, factor in _BINARY:
        if value and value % factor == 0:
            return f"{value // factor}{unit}"
    return f"{value}B"


Size = Annotated[
    ByteSize,
    BeforeValidator(parse_size),
    PlainSerializer(format_size, return_type=str),
    WithJsonSchema({"type": "string", "pattern": _SIZE.pattern, "examples": ["512MiB", "2GiB"]}),
]

# Its own examples: the sizes' 512MiB and 2GiB are no cluster sizes (512 B to 2 MiB).
ClusterSize = Annotated[
    Size,
    WithJsonSchema({"type": "string", "pattern": _SIZE.pattern, "examples": ["64KiB", "1MiB"]}),
]


class StrictModel(BaseModel):
    """A configuration table: frozen, unknown keys refused, attribute docstrings described."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)
