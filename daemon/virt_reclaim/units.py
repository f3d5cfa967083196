"""Sizes and times for operators: printed readable, and durations read as they write them."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Any

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(size: int | None) -> str:
    """Format a byte count with a binary unit, ``-`` for None: ``1536`` -> ``1.5 KiB``."""
    if size is None:
        return "-"
    value = float(size)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def iso_time(stamp: float | None) -> str | None:
    """Epoch seconds as an ISO 8601 UTC time (``2026-12-03T08:00:00Z``); None stays None."""
    if stamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


# C0 controls but tab, DEL and C1 controls: what a terminal acts on instead of showing.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    r"""``text`` with its control characters shown as ``\xNN`` escapes.

    Guests name their own filesystems, mountpoints and OS: printed to an operator's
    terminal as they are, an escape sequence in them would act on that terminal.
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


# A duration in a policy file or on the command line: a number and one unit.
DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> Any:  # noqa: ANN401 - pydantic passes any input
    """Read "30s", "15m", "2h", "7d" (or a number of seconds) as a timedelta."""
    if isinstance(value, bool):
        raise ValueError("a duration like 30s, 15m, 2h or 7d, not a boolean")
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = DURATION_RE.match(value)
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
