"""Guest strings (OS names, mountpoints) reach an operator's terminal without acting on it."""

from __future__ import annotations

import io

import structlog

from virt_reclaim import logs
from virt_reclaim.cli.render import print_domain_table
from virt_reclaim.model import DomainState
from virt_reclaim.reports.inventory import DomainReport
from virt_reclaim.units import printable

# Clear the screen, set the window title, and a line that pretends to be another.
HOSTILE = "debian\x1b[2J\x1b]0;owned\x07\nroot OK"


def test_control_characters_are_shown_not_sent() -> None:
    assert printable(HOSTILE) == "debian\\x1b[2J\\x1b]0;owned\\x07\\x0aroot OK"
    assert printable("tab\tand ünïcode stay") == "tab\tand ünïcode stay"


def test_the_console_log_escapes_what_a_guest_wrote() -> None:
    out = io.StringIO()
    logs.configure(logs.LogFormat.CONSOLE, stream=out)
    try:
        structlog.get_logger("test").warning("free_space.unavailable", mountpoint=HOSTILE)
    finally:
        logs.configure(logs.LogFormat.JSON)
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert text.count("\n") == 1
    assert "\\x1b[2J" in text


def test_the_domains_table_escapes_the_guest_os_name() -> None:
    report = DomainReport(
        name="web", uuid="u", state=DomainState.RUNNING, persistent=True,
        has_agent_channel=True, agent_connected=True, disks=(), os=HOSTILE,
    )  # fmt: skip
    out = io.StringIO()

    print_domain_table([report], out)

    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert len(text.splitlines()) == 2  # the header and the domain's row
