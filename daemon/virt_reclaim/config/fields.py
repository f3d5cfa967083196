"""What policy files and the daemon configuration share: the strict base model, durations, sizes.

Durations and sizes read as operators write them ("4h", "2GiB") and their defaults come out of
the JSON Schema the same way. Apart from the policy models, so that the daemon configuration, which
every command reads, need not build those.
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

from virt_reclaim.units import DURATION_RE, format_duration, parse_duration

# The schema says what check accepts: not JSON Schema's "duration" format (ISO 8601,
# "PT4H"), which parse_duration refuses. Defaults come out through the serializer.
Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {"type": "string", "pattern": DURATION_RE.pattern, "examples": ["15m", "2h", "7d"]}
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


class Model(BaseModel):
    """A settings table: frozen, and an unknown key is an error (a typo must not pass)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)
