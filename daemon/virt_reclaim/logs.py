"""structlog setup: JSON lines for journald and scripts, readable console output on a TTY."""

from __future__ import annotations

import enum
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from virt_reclaim.units import printable


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
        _ConsoleSafe(structlog.dev.ConsoleRenderer(colors=False))
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
