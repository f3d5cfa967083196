"""Human-readable sizes and times for operator-facing output."""

from __future__ import annotations

import re
import time

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
