"""The worker threads always report back to the main loop, whatever happens in them."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import structlog

from virt_reclaim.config import loading
from virt_reclaim.config.policy import Policy
from virt_reclaim.job.results import Outcome
from virt_reclaim.service import workers
from virt_reclaim.service.messages import Estimated, JobDone, JobEnd, Message
from virt_reclaim.service.scheduler import Candidate

POLICY = Policy.model_validate(
    {"name": "p", "match": {"names": ["*"]}, "schedule": {"cron": "0 2 * * *"}}
)
DAEMON_CONFIG = loading.DaemonConfig()


def test_an_estimate_that_crashes_still_posts_so_the_window_can_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def crash(*_args: Any, **_kwargs: Any) -> list[Candidate]:
        raise KeyError("a bug")

    monkeypatch.setattr(workers, "estimate_candidates", crash)
    posted: list[Message] = []
    pool = workers.Workers(posted.append)
    with structlog.testing.capture_logs() as events:
        pool._run_estimates(DAEMON_CONFIG, POLICY, [], 1.0)
    assert posted == [Estimated("p", [])]
    [failed] = events
    assert failed["event"] == "window.estimate_failed" and failed["log_level"] == "error"
    assert failed["exc_info"] is True


def test_a_job_thread_posts_its_outcome_and_is_forgotten_when_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen_stop: list[threading.Event] = []

    def run_candidate(
        _c: Candidate, _p: Policy, _s: Any, stop: threading.Event, _progress: Any = None
    ) -> JobEnd:
        seen_stop.append(stop)
        return JobEnd(Outcome.RECLAIMED, waits_for_space=False)

    monkeypatch.setattr(workers, "run_candidate", run_candidate)
    posted: list[Message] = []
    done = threading.Event()

    def post(message: Message) -> None:
        posted.append(message)
        done.set()

    pool = workers.Workers(post)
    candidate = Candidate("vm", "uuid-vm", "p", 10, 5, 60.0)
    pool.start_job(candidate, POLICY, DAEMON_CONFIG, now=42.0)
    assert done.wait(10)
    assert posted == [JobDone("uuid-vm", JobEnd(Outcome.RECLAIMED, waits_for_space=False))]
    assert seen_stop == [pool.stop]
    assert pool.running["uuid-vm"].started == 42.0
    job = pool.job_done("uuid-vm")
    assert job is not None and job.domain == "vm" and not job.thread.is_alive()
    assert pool.running == {}
    assert pool.job_done("uuid-vm") is None
