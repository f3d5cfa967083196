"""structlog setup: JSON lines for journald and scripts, readable console output on a TTY."""

from __future__ import annotations

import enum
import logging
import sys
from typing import TextIO

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
    stream = stream or sys.stderr
    use_console = fmt is LogFormat.CONSOLE or (fmt is LogFormat.AUTO and stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=False)
        if use_console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
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
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
