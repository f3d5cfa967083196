"""The daemon's main loop hands each message of its inbox to the handler of its kind."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import structlog

from virt_reclaim.job.results import Outcome
from virt_reclaim.service.daemon import Daemon
from virt_reclaim.service.messages import (
    ConnectionClosed,
    Estimated,
    Fired,
    JobDone,
    JobEnd,
    Lifecycle,
    Message,
)
from virt_reclaim.service.scheduler import Candidate
from virt_reclaim.service.workers import RunningJob

ENDED = JobEnd(Outcome.RECLAIMED, waits_for_space=False)
CANDIDATE = Candidate("vm", "uuid-vm", "p", 10, 5, 60.0)


def test_the_kinds_are_the_names_the_logs_have_always_given() -> None:
    kinds = [m.kind for m in (Fired, Lifecycle, ConnectionClosed, Estimated, JobDone)]
    assert kinds == ["fired", "lifecycle", "closed", "estimated", "job-done"]


@pytest.fixture
def daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Daemon, list[tuple[object, ...]]]:
    """A daemon whose handlers only record what they were given."""
    made = Daemon(str(tmp_path), clock=lambda: 100.0)
    calls: list[tuple[object, ...]] = []
    for kind in ("fired", "lifecycle", "closed", "estimated", "job_done"):
        monkeypatch.setattr(made, f"_on_{kind}", lambda *args, k=kind: calls.append((k, *args)))
    return made, calls


def test_each_message_reaches_its_handler_in_the_order_posted(
    daemon: tuple[Daemon, list[tuple[object, ...]]],
) -> None:
    made, calls = daemon
    posted: list[Message] = [
        Fired("nightly"),
        Lifecycle("uuid-vm", "vm", "started"),
        ConnectionClosed("eof"),
        Estimated("nightly", [CANDIDATE]),
        JobDone("uuid-vm", ENDED),
    ]
    for message in posted:
        made._post(message)

    made._drain_inbox()

    assert calls == [
        ("fired", "nightly"),
        ("lifecycle", "uuid-vm", "vm", "started"),
        ("closed", "eof"),
        ("estimated", "nightly", [CANDIDATE]),
        ("job_done", "uuid-vm", ENDED),
    ]
    assert made.inbox.empty()


def test_a_handler_that_fails_is_logged_by_its_kind_and_the_next_message_still_handled(
    daemon: tuple[Daemon, list[tuple[object, ...]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    made, calls = daemon

    def broken(uuid: str, ended: JobEnd) -> None:
        raise KeyError(uuid)

    monkeypatch.setattr(made, "_on_job_done", broken)
    made._post(JobDone("uuid-vm", ENDED))
    made._post(ConnectionClosed("eof"))

    with structlog.testing.capture_logs() as events:
        made._drain_inbox()

    [failed] = [e for e in events if e["event"] == "daemon.handler_failed"]
    assert failed["message"] == "job-done" and failed["log_level"] == "error"
    assert calls == [("closed", "eof")]


def test_a_policy_that_fires_after_it_was_removed_opens_no_window(tmp_path: Path) -> None:
    made = Daemon(str(tmp_path), clock=lambda: 100.0)
    made._post(Fired("gone"))

    made._drain_inbox()

    assert made.windows.open == {}


def test_a_job_done_is_logged_with_its_outcome_as_the_string(tmp_path: Path) -> None:
    made = Daemon(str(tmp_path), clock=lambda: 100.0)
    thread = threading.Thread(target=lambda: None)
    thread.start()
    made.workers.running["uuid-vm"] = RunningJob("vm", "p", thread, 90.0, CANDIDATE)
    made._post(JobDone("uuid-vm", ENDED))

    with structlog.testing.capture_logs() as events:
        made._drain_inbox()

    [ended] = [e for e in events if e["event"] == "job.ended"]
    assert type(ended["outcome"]) is str and ended["outcome"] == "reclaimed"
    assert made.running == {} and not thread.is_alive()
