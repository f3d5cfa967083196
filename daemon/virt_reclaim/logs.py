"""structlog setup: JSON lines for journald and scripts, readable console output on a TTY."""

from __future__ import annotations

import enum
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, TextIO

from virt_reclaim.units import printable

if TYPE_CHECKING:
    import structlog


class LogFormat(enum.StrEnum):
    """How log events are written."""

    AUTO = "auto"  # console on a terminal, JSON otherwise
    JSON = "json"
    CONSOLE = "console"


def configure(
    fmt: LogFormat = LogFormat.AUTO, stream: TextIO | None = None, level: int = logging.INFO
) -> None:
    """Send every event from ``level`` up, with time, level and context, to ``stream`` (stderr)."""
    # Imported here: the command line reads LogFormat to build its parser, and commands that
    # log nothing (history, --help) need not pay for structlog's import.
    import structlog  # noqa: PLC0415

    stream = stream or sys.stderr
    use_console = fmt is LogFormat.CONSOLE or (fmt is LogFormat.AUTO and stream.isatty())
    renderer: structlog.typing.Processor = (
        _ConsoleSafe(structlog.dev.ConsoleRenderer(colors=False))
        if use_console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    if stderr_is_journal(stream):
        renderer = _Prioritized(renderer)
    structlog.configure(
        processors=[*_shared_processors(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the standard library (APScheduler does): same format, same stream.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *_shared_processors()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # APScheduler says "Running job ..." at every firing; our own events say more.
    logging.getLogger("apscheduler").setLevel(max(level, logging.WARNING))


def _shared_processors() -> list[structlog.typing.Processor]:
    import structlog  # noqa: PLC0415 - see configure

    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]


class _ConsoleSafe:
    """The console renderer, fed with control characters escaped (see units.printable).

    JSON lines escape them by themselves; a terminal would act on them.
    """

    def __init__(self, renderer: structlog.typing.Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> Any:  # noqa: ANN401
        safe = {
            key: printable(value) if isinstance(value, str) and key != "exception" else value
            for key, value in event.items()
        }
        return self._renderer(logger, name, safe)


# syslog(3) priorities by structlog's level names; journald reads them from a "<N>" prefix.
SYSLOG_PRIORITY = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
}


def stderr_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal's stream socket, as sd_journal_stream_fd(3) says.

    systemd sets ``JOURNAL_STREAM=DEVICE:INODE`` for a service whose stderr (or stdout) goes to
    the journal; comparing it with the stream's own device and inode tells a redirected stderr
    (a child's, a pipe in a test) from the journal's.
    """
    env = os.environ if environ is None else environ
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):  # no file behind it, or a malformed value
        return False


class _Prioritized:
    """A renderer whose lines start with their syslog priority (``<3>`` for an error)."""

    def __init__(self, renderer: structlog.typing.Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> Any:  # noqa: ANN401
        level = str(event.get("level", name)).lower()
        prefix = f"<{SYSLOG_PRIORITY.get(level, 6)}>"
        text = self._renderer(logger, name, event)
        # journald starts an entry at each newline (a console traceback): each needs its prefix.
        return "\n".join(prefix + line for line in str(text).split("\n"))
