"""``virt-reclaim status``: the snapshot the daemon publishes, and the command that reads it.

A real ``virt-reclaim daemon`` on libvirt's test driver (no guests) publishes; the command
runs as operators run it. The snapshot's parts the daemon only has with jobs (queue,
progress) are driven on a Daemon object given its state by hand.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from testbed.daemon import DaemonProcess, write_config
from virt_reclaim.config.policy import Policy
from virt_reclaim.job.results import Outcome
from virt_reclaim.job.settings import JobSettings
from virt_reclaim.journal.store import Journal
from virt_reclaim.reports.status import build_report, is_alive
from virt_reclaim.service import status, windows, workers
from virt_reclaim.service.daemon import Daemon
from virt_reclaim.service.scheduler import Candidate


def policy(name: str, cron: str = "0 3 * * *") -> str:
    return f'[[policy]]\nname = "{name}"\nmatch.names = ["nothing-*"]\nschedule.cron = "{cron}"\n'


def run_status(config_dir: Path, *options: str) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "virt_reclaim", "status", "--config-dir", str(config_dir),
         *options],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    data = json.loads(proc.stdout) if "--json" in options else {}
    return proc.returncode, data, proc.stdout + proc.stderr


def wait_for(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Running:
    def __init__(self, tmp_path: Path) -> None:
        self.state = tmp_path / "state"
        daemon_file = f'uri = "test:///default"\nstate_dir = "{self.state}"\nlog_format = "json"\n'
        self.etc = write_config(tmp_path / "etc", daemon_file, {"10-first.toml": policy("first")})
        self.daemon = DaemonProcess(self.etc)
        self.daemon.wait_event("daemon.started", 60)
        # The first snapshot of the running phase follows the start at the next tick.
        wait_for(lambda: (s := status.read_snapshot(str(self.state))) is not None
                 and s.phase is status.Phase.RUNNING)  # fmt: skip


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    daemon = Running(tmp_path)
    yield daemon
    daemon.daemon.stop()


def test_no_daemon_exits_3(tmp_path: Path) -> None:
    etc = write_config(tmp_path / "etc", f'state_dir = "{tmp_path / "state"}"\n', {})

    code, data, _ = run_status(etc, "--json")
    assert code == 3
    assert data["daemon"]["running"] is False
    assert data["config"] is None
    assert not (tmp_path / "state" / "journal.sqlite3").exists()  # status creates nothing

    code, _, text = run_status(etc)
    assert code == 3
    assert "daemon: not running (no snapshot in" in text


def test_a_running_daemon_tells_what_it_does_and_then_that_it_stopped(running: Running) -> None:
    code, data, text = run_status(running.etc, "--json")

    assert code == 0, text
    pid = running.daemon.proc.pid
    assert data["daemon"] | {"since": None, "snapshot_at": None} == {
        "running": True, "pid": pid, "since": None, "phase": "running", "snapshot_at": None,
        "stale": False, "uri": "test:///default", "libvirt_outage": None,
    }  # fmt: skip
    config = data["config"]
    assert config["files"] == [str(running.etc / "policies.d" / "10-first.toml")]
    assert config["policies"] == ["first"]
    assert (config["last_reload"], config["on_last_good"]) == (None, False)
    [window] = data["windows"]
    assert (window["policy"], window["open"]) == ("first", False)
    assert window["next_run"].endswith("T03:00:00Z")
    assert (data["jobs"], data["queued"], data["backups"]) == ([], [], {"count": 0, "bytes": 0})

    code, _, text = run_status(running.etc)
    assert code == 0
    assert f"daemon: running, pid {pid}, since " in text
    assert "first: closed; next start " in text

    running.daemon.signal(signal.SIGTERM)
    assert running.daemon.wait_exit(60) == 0
    code, data, _ = run_status(running.etc, "--json")
    assert code == 3
    assert (data["daemon"]["running"], data["daemon"]["pid"]) == (False, pid)


def test_a_rejected_reload_shows_the_daemon_on_its_last_good_configuration(
    running: Running,
) -> None:
    (running.etc / "policies.d" / "20-second.toml").write_text(policy("second", cron="61 * * *"))
    running.daemon.signal(signal.SIGHUP)
    running.daemon.wait_event("config.reload_failed", 30)
    wait_for(lambda: (s := status.read_snapshot(str(running.state))) is not None
             and s.config.rejected is not None)  # fmt: skip

    code, data, text = run_status(running.etc, "--json")

    assert code == 0, text
    config = data["config"]
    assert config["on_last_good"] is True
    assert "was rejected (1 error(s))" in config["rejected"]
    assert (config["last_reload"]["verdict"], config["last_reload"]["errors"]) == ("rejected", 1)
    assert config["policies"] == ["first"]
    _, _, text = run_status(running.etc)
    assert "running on the last good configuration: the reload at" in text


def snapshot(**changes: Any) -> status.Snapshot:
    base = status.Snapshot(
        pid=os.getpid(), proc_start=status.proc_start(os.getpid()), started_at=1.0,
        written_at=time.time(), phase=status.Phase.RUNNING, uri="test:///default",
        libvirt_outage=None, config=status.ConfigState("/etc/x", (), (), None),
        windows=(), jobs=(), queued=(),
    )  # fmt: skip
    return replace(base, **changes)


def test_a_pid_given_to_another_process_is_not_the_daemon() -> None:
    mine = snapshot()
    assert status.proc_start(os.getpid()) is not None
    assert is_alive(mine)
    assert not is_alive(replace(mine, proc_start=(mine.proc_start or 0) + 1))
    assert not is_alive(replace(mine, phase=status.Phase.STOPPED))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not is_alive(replace(mine, pid=gone.pid, proc_start=None))


def test_the_publisher_writes_changes_at_once_and_repeats_only_when_due(tmp_path: Path) -> None:
    publisher = status.Publisher(interval_s=5.0)
    first = snapshot(written_at=100.0)

    assert publisher.publish(str(tmp_path), first)
    assert not publisher.publish(str(tmp_path), replace(first, written_at=101.0))
    assert publisher.publish(str(tmp_path), replace(first, written_at=102.0, uri="test:///x"))
    assert status.read_snapshot(str(tmp_path)) == replace(first, written_at=102.0, uri="test:///x")
    assert publisher.publish(str(tmp_path), replace(first, written_at=107.5, uri="test:///x"))
    assert [p.name for p in tmp_path.iterdir()] == [status.STATUS_FILE]  # no temp file left


def test_jobs_progress_queue_and_journal_are_reported(tmp_path: Path) -> None:
    state = tmp_path / "state"
    daemon = Daemon(str(tmp_path), clock=lambda: 1000.0)
    daemon.daemon_config = daemon.daemon_config.model_copy(update={"state_dir": str(state)})
    daemon.policies = (Policy.model_validate(
        {"name": "p", "match": {"names": ["*"]}, "schedule": {"cron": "0 3 * * *"}}
    ),)  # fmt: skip
    daemon.windows.open["p"] = windows.Window("p", ends_at=1600.0, busy={"u3": ("busy-vm", "x")})
    queued = [Candidate("vm2", "u2", "p", 10, 5 * 2**30, 600.0),
              Candidate("vm4", "u4", "p", 10, 2**30, 60.0)]  # fmt: skip
    daemon.windows.queue = queued
    daemon.windows.held["u4"] = 1060.0
    job = workers.RunningJob("vm1", "p", threading.Thread(), 990.0, queued[0])
    job.progress = ("vda", 42.5)
    daemon.running["u1"] = job
    journal = Journal(state)
    journal.begin_job("j1", "vm1", "u1", JobSettings())
    journal.enter_step("j1", "rewrite")
    journal.begin_job("j0", "vm0", "u0", JobSettings())
    journal.finish_job("j0", outcome=Outcome.RECLAIMED, reason="done", bytes_before=300,
                       bytes_after=100, downtime_s=1.0, duration_s=2.0)  # fmt: skip
    journal.close()

    status.write_snapshot(
        str(state), status.snapshot_of(daemon, status.Phase.RUNNING, lambda: 5000.0)
    )
    built = build_report(str(state), now=5001.0)
    data = built.to_json()

    assert data["jobs"] == [{"domain": "vm1", "policy": "p", "started_at": "1970-01-01T01:23:10Z",
                             "step": "rewrite", "disk": "vda", "percent": 42.5}]  # fmt: skip
    assert [(q["domain"], q["waiting_for_space"]) for q in data["queued"]] == [
        ("vm2", False),
        ("vm4", True),
    ]
    assert data["windows"] == [{
        "policy": "p", "open": True, "open_until": "1970-01-01T01:33:20Z", "opens_late_at": None,
        "next_run": "1970-01-01T03:00:00Z", "estimating": False, "watched_busy": ["busy-vm"],
    }]  # fmt: skip
    assert [(r["domain"], r["outcome"], r["bytes_after"]) for r in data["last_results"]] == [
        ("vm0", "reclaimed", 100)
    ]


def test_next_runs_are_worked_out_again_only_once_they_passed() -> None:
    publisher = status.Publisher()
    first = publisher.next_run("0 3 * * *", "UTC", 0.0)
    assert first == 3 * 3600
    assert publisher.next_run("0 3 * * *", "UTC", 3 * 3600 - 1) == first
    assert publisher.next_run("0 3 * * *", "UTC", 3 * 3600 + 1) == 27 * 3600
