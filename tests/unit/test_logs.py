"""When stderr is the journal, each log line starts with its syslog priority (``<3>``).

journald reads that prefix (SyslogLevelPrefix=yes, its default), so ``journalctl -p err``
selects the errors; the rest of the line stays the JSON object.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest
import structlog

from virt_reclaim import logs


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[TextIO]:
    """A real file standing in for stderr (the journal check needs its device and inode)."""
    with (tmp_path / "stderr").open("w+") as stream:
        yield stream
    logs.configure(logs.LogFormat.JSON)


def journal_stream(stream: TextIO) -> str:
    st = os.fstat(stream.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def log_every_level(stream: TextIO, fmt: logs.LogFormat = logs.LogFormat.JSON) -> list[str]:
    logs.configure(fmt, stream=stream, level=logging.DEBUG)
    log = structlog.get_logger("test")
    log.debug("test.debug")
    log.info("test.info", domain="web-1")
    log.warning("test.warning")
    log.error("test.error")
    log.critical("test.critical")
    logging.getLogger("apscheduler.scheduler").error("a library's error")
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def test_lines_to_the_journal_carry_their_priority(
    log_file: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream(log_file))

    lines = log_every_level(log_file)

    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>", "<3>"]
    events = [json.loads(line[3:]) for line in lines]
    assert [e["event"] for e in events[:5]] == [
        "test.debug", "test.info", "test.warning", "test.error", "test.critical",
    ]  # fmt: skip
    assert events[1]["domain"] == "web-1"
    assert events[5]["event"] == "a library's error" and events[5]["level"] == "error"


def test_console_lines_to_the_journal_carry_it_too(
    log_file: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream(log_file))

    lines = log_every_level(log_file, logs.LogFormat.CONSOLE)

    assert lines[3].startswith("<3>") and "test.error" in lines[3]


@pytest.mark.parametrize("value", [None, "0:0", "garbage", "12"])
def test_lines_elsewhere_are_unchanged(
    log_file: TextIO, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    """No journal, or a JOURNAL_STREAM inherited by a process whose stderr went elsewhere."""
    if value is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        monkeypatch.setenv("JOURNAL_STREAM", value)

    lines = log_every_level(log_file)

    assert [json.loads(line)["level"] for line in lines] == [
        "debug", "info", "warning", "error", "critical", "error",
    ]  # fmt: skip


def test_a_stream_without_a_file_is_not_the_journal() -> None:
    assert not logs.stderr_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})
