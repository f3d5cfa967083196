"""The types of the command line's option values: each parses one text or says why not."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import time
from typing import TYPE_CHECKING

from virt_reclaim.job.results import Outcome
from virt_reclaim.journal.queries import UNFINISHED
from virt_reclaim.units import MIB, parse_duration

if TYPE_CHECKING:
    from pydantic import ByteSize, TypeAdapter

# What ``history --outcome`` accepts: how jobs end, and "unfinished" for those with no end yet.
HISTORY_OUTCOMES = (*(outcome.value for outcome in Outcome), UNFINISHED)


@functools.cache
def _byte_size() -> TypeAdapter[ByteSize]:
    # Imported on first use: building the parser must not cost pydantic's import, which only
    # the commands that take a size (run) need at parse time.
    from pydantic import ByteSize, TypeAdapter  # noqa: PLC0415 - lazily, see above

    return TypeAdapter(ByteSize)


def size(text: str) -> int:
    """Parse a size like "64MiB", "1GiB" or "500MB" (argparse type)."""
    from pydantic import ValidationError  # noqa: PLC0415 - see _byte_size

    try:
        return int(_byte_size().validate_python(text))
    except ValidationError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (examples: 512MiB, 20GiB, 1000000)"
        ) from None


def cluster_size(text: str) -> int:
    """Parse a qcow2 cluster size: a power of two from 512 bytes to 2 MiB."""
    value = size(text)
    if value < 512 or value > 2 * MIB or value & (value - 1):
        raise argparse.ArgumentTypeError(
            f"{text!r} is {value} bytes; a qcow2 cluster size is a power of two from 512 to "
            "2MiB (write 64KiB, not 64K, which means 64000)"
        )
    return value


def duration(text: str) -> float:
    """Parse a duration like "30s", "15m", "2h", "7d" into seconds (argparse type)."""
    try:
        return float(parse_duration(text).total_seconds())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (examples: 30s, 15m, 2h, 7d)"
        ) from None


def seconds(text: str) -> float:
    """Parse a positive number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def since(text: str) -> float:
    """Parse "7d" (that long ago) or an ISO date or time (UTC unless given) into epoch seconds."""
    try:
        back: dt.timedelta = parse_duration(text)
    except ValueError:
        pass
    else:
        return time.time() - back.total_seconds()
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (30m, 12h, 7d) nor a date (2026-12-01, "
            "2026-12-01T08:00, 2026-12-01T08:00+01:00)"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def count(text: str) -> int:
    """Parse a positive whole number (argparse type)."""
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def outcomes(text: str) -> list[str]:
    """Parse "failed" or "failed,abandoned" into outcomes ``history`` knows (argparse type)."""
    named = [part.strip() for part in text.split(",")]
    unknown = [part for part in named if part not in HISTORY_OUTCOMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{', '.join(map(repr, unknown))}: not an outcome; choose from "
            f"{', '.join(HISTORY_OUTCOMES)}"
        )
    return named


def pid(text: str) -> int:
    """Parse a process id (argparse type)."""
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id")
    return int(text)
