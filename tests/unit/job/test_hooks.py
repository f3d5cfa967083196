"""A policy's hooks: before_shutdown may skip the guest, after_job hears how every job ended.

Real images and real qemu-img under a faked domain (tests/fakes.py), as the
frame's tests; the hooks are tiny shell scripts the tests write, which dump their
``VIRT_RECLAIM_*`` environment into a file.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from fakes import FakeDisk, FakeDomain, linux_fs, make_image
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.context import Step
from virt_reclaim.job.frame import ReclaimJob
from virt_reclaim.job.results import JobResult, Outcome
from virt_reclaim.job.settings import JobHooks, JobSettings
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import DomainState

MIB = 1024 * 1024


@pytest.fixture
def domain(tmp_path: Path) -> FakeDomain:
    image = make_image(tmp_path / "disk.qcow2", "256M", ("write -P 0x61 0 32M",
                                                        "write -P 0 32M 32M"))  # fmt: skip
    return FakeDomain(
        [FakeDisk("vda", image)], filesystems=[linux_fs("/", "vda", total=240 * MIB, used=33 * MIB)]
    )


def script(path: Path, body: str, mode: int = 0o700) -> str:
    """An executable shell script at ``path``; its absolute path."""
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(mode)
    return str(path)


def dumper(folder: Path, name: str, then: str = "") -> tuple[list[str], Path]:
    """A hook that writes its VIRT_RECLAIM_* variables to a file; its argv and that file."""
    out = folder / f"{name}.env"
    program = script(folder / f"{name}.sh", f'env | grep ^VIRT_RECLAIM_ > "$1"\n{then}')
    return [program, str(out)], out


def env_of(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return dict(pairs)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(
    domain: FakeDomain, state: Path, hooks: JobHooks, **options: Any
) -> tuple[JobResult, Journal, list[MutableMapping[str, Any]]]:
    journal = Journal(state)
    before_step = options.pop("before_step", None)
    stop = options.pop("stop", None)
    job = ReclaimJob(
        domain,
        QemuImg(priority=None),
        JobSettings(**{"min_gain": 0, "hooks": hooks, **options}),
        images_of_other_domains=dict,
        journal=journal,
        before_step=before_step,
        stop=stop,
    )
    with structlog.testing.capture_logs() as events:
        result = job.run()
    return result, journal, events


def hook_events(events: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in events if e["event"].startswith("hook.")]


def test_a_before_hook_that_succeeds_runs_just_before_the_shutdown_with_the_jobs_identity(
    domain: FakeDomain, tmp_path: Path
) -> None:
    argv, out = dumper(tmp_path, "before")
    at_shutdown: list[tuple[bool, DomainState]] = []

    def watch(step: Step) -> None:
        if step is Step.SHUTDOWN:
            at_shutdown.append((out.exists(), domain.power))
        if step is Step.FREE_SPACE:
            assert not out.exists(), "the hook ran before the free-space step"

    result, journal, events = run(
        domain, tmp_path / "state", JobHooks(before_shutdown=tuple(argv)), before_step=watch
    )

    assert result.outcome is Outcome.RECLAIMED, result.reason
    # It ran, and had ended, while the guest was still running: the shutdown came after.
    assert at_shutdown == [(True, DomainState.RUNNING)]
    assert env_of(out) == {
        "VIRT_RECLAIM_DOMAIN": "fake",
        "VIRT_RECLAIM_DOMAIN_UUID": domain.uuid,
        "VIRT_RECLAIM_JOB_ID": result.job_id,
        "VIRT_RECLAIM_MODE": "offline",
        "VIRT_RECLAIM_PHASE": "before_shutdown",
    }
    [done] = hook_events(events)
    assert (done["event"], done["phase"], done["program"], done["status"]) == (
        "hook.done", "before_shutdown", argv[0], 0,
    )  # fmt: skip
    assert "shutdown" in journal.history()[0].steps


def test_a_failing_before_hook_skips_the_guest_untouched_and_names_the_hook(
    domain: FakeDomain, tmp_path: Path
) -> None:
    image = domain.disks[0].path
    original = sha256(image)
    refused = "curl: (7) Failed to connect to alertmanager port 9093"
    program = script(tmp_path / "silence.sh", f'echo "posting" >&2\necho "{refused}" >&2\nexit 3')
    after, after_out = dumper(tmp_path, "after")

    result, journal, events = run(
        domain, tmp_path / "state", JobHooks(before_shutdown=(program,), after_job=tuple(after))
    )

    assert result.outcome is Outcome.SKIPPED
    assert result.reason == (
        f"before_shutdown hook {program}: exited with status 3: curl: (7) Failed to connect to "
        "alertmanager port 9093; the guest was left running, nothing changed"
    )
    assert domain.power is DomainState.RUNNING
    assert not any(call.startswith(("shutdown", "force_off")) for call in domain.calls)
    assert sha256(image) == original
    [entry] = journal.history()
    assert entry.outcome == "skipped"
    assert "shutdown" not in entry.steps and "restore" not in entry.steps
    failed = hook_events(events)[0]
    assert (failed["event"], failed["status"]) == ("hook.failed", 3)
    # The after hook still runs (it expires what the before hook may have half done).
    assert env_of(after_out)["VIRT_RECLAIM_OUTCOME"] == "skipped"


def test_a_before_hook_that_overruns_is_killed_with_its_children_and_skips_the_guest(
    domain: FakeDomain, tmp_path: Path
) -> None:
    child = tmp_path / "child.pid"
    program = script(tmp_path / "slow.sh", f'sleep 60 &\necho $! > "{child}"\nwait')
    original = sha256(domain.disks[0].path)
    began = time.monotonic()

    result, _journal, _events = run(
        domain, tmp_path / "state", JobHooks(before_shutdown=(program,), timeout_s=1.0)
    )

    assert time.monotonic() - began < 30
    assert result.outcome is Outcome.SKIPPED
    assert f"before_shutdown hook {program}: killed after 1 s timeout" in result.reason
    assert domain.power is DomainState.RUNNING
    assert sha256(domain.disks[0].path) == original
    pid = int(child.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the hook's child outlived the timeout"


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting for its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.split(b") ", 1)[1][:1] != b"Z"


def test_the_after_hook_hears_the_outcome_and_the_bytes(domain: FakeDomain, tmp_path: Path) -> None:
    before, before_out = dumper(tmp_path, "before")
    after, after_out = dumper(tmp_path, "after")

    result, journal, events = run(
        domain, tmp_path / "state",
        JobHooks(before_shutdown=tuple(before), after_job=tuple(after)),
    )  # fmt: skip

    assert result.outcome is Outcome.RECLAIMED, result.reason
    [entry] = journal.history()
    assert entry.bytes_before is not None and entry.bytes_after is not None
    env = env_of(after_out)
    assert env == {
        "VIRT_RECLAIM_DOMAIN": "fake",
        "VIRT_RECLAIM_DOMAIN_UUID": domain.uuid,
        "VIRT_RECLAIM_JOB_ID": result.job_id,
        "VIRT_RECLAIM_MODE": "offline",
        "VIRT_RECLAIM_PHASE": "after_job",
        "VIRT_RECLAIM_OUTCOME": "reclaimed",
        "VIRT_RECLAIM_REASON": result.reason,
        "VIRT_RECLAIM_BYTES_BEFORE": str(entry.bytes_before),
        "VIRT_RECLAIM_BYTES_AFTER": str(entry.bytes_after),
        "VIRT_RECLAIM_RECLAIMED_BYTES": str(entry.bytes_before - entry.bytes_after),
        "VIRT_RECLAIM_DOWNTIME_S": f"{result.downtime_s:.3f}",
    }
    assert entry.bytes_before - entry.bytes_after > 16 * MIB
    assert env_of(before_out)["VIRT_RECLAIM_JOB_ID"] == result.job_id
    # Once each, the after hook last (after the job's own summary).
    names = [e["event"] for e in events if e["event"] in {"hook.done", "job.finished"}]
    assert names == ["hook.done", "job.finished", "hook.done"]


def test_a_failing_after_hook_is_logged_and_the_outcome_stands(
    domain: FakeDomain, tmp_path: Path
) -> None:
    program = script(tmp_path / "notify.sh", "echo 'no route to the chat server' >&2\nexit 1")

    result, journal, events = run(domain, tmp_path / "state", JobHooks(after_job=(program,)))

    assert result.outcome is Outcome.RECLAIMED, result.reason
    assert journal.history()[0].outcome == "reclaimed"
    [failed] = hook_events(events)
    assert failed["event"] == "hook.failed" and failed["log_level"] == "warning"
    assert failed["phase"] == "after_job" and failed["status"] == 1
    assert failed["reason"] == "exited with status 1: no route to the chat server"


def test_no_hook_runs_for_a_dry_run_or_a_job_that_ends_in_its_read_only_steps(
    domain: FakeDomain, tmp_path: Path
) -> None:
    before, before_out = dumper(tmp_path, "before")
    after, after_out = dumper(tmp_path, "after")
    hooks = JobHooks(before_shutdown=tuple(before), after_job=tuple(after))

    dry, _, _ = run(domain, tmp_path / "s1", hooks, dry_run=True)
    small, _, _ = run(domain, tmp_path / "s2", hooks, min_gain=1024 * MIB)

    assert (dry.outcome, small.outcome) == (Outcome.DRY_RUN, Outcome.NOTHING_TO_DO)
    assert not before_out.exists() and not after_out.exists()


def test_a_shut_off_guest_runs_no_before_hook_but_the_after_hook(
    domain: FakeDomain, tmp_path: Path
) -> None:
    domain.power = DomainState.SHUTOFF
    before, before_out = dumper(tmp_path, "before")
    after, after_out = dumper(tmp_path, "after")

    result, _, _ = run(domain, tmp_path / "state",
                       JobHooks(before_shutdown=tuple(before), after_job=tuple(after)))  # fmt: skip

    assert result.outcome is Outcome.RECLAIMED, result.reason
    assert not before_out.exists()
    assert env_of(after_out)["VIRT_RECLAIM_OUTCOME"] == "reclaimed"


def test_a_hook_program_others_may_write_is_refused(domain: FakeDomain, tmp_path: Path) -> None:
    argv, out = dumper(tmp_path, "before")
    os.chmod(argv[0], 0o722)  # noqa: S103 - the unsafe mode is the point

    result, _, _ = run(domain, tmp_path / "state", JobHooks(before_shutdown=tuple(argv)))

    assert result.outcome is Outcome.SKIPPED
    assert f"{argv[0]} is writable by group or others" in result.reason
    assert not out.exists()
    assert domain.power is DomainState.RUNNING


def test_a_stop_during_the_before_hook_kills_it_and_abandons_the_job(
    domain: FakeDomain, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    program = script(tmp_path / "slow.sh", f'touch "{started}"\nsleep 60')
    stop = threading.Event()

    def stop_once_started() -> None:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()

    setter = threading.Thread(target=stop_once_started)
    setter.start()
    try:
        hooks = JobHooks(before_shutdown=(program,), timeout_s=60)
        result, _, _ = run(domain, tmp_path / "state", hooks, stop=stop)
    finally:
        setter.join()

    assert result.outcome is Outcome.ABANDONED
    assert "before_shutdown hook" in result.reason
    assert domain.power is DomainState.RUNNING


EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "hooks" / "alertmanager-silence"


@pytest.fixture
def silence_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """The README's Alertmanager hook, with a curl that logs its arguments and answers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "curl.log"
    script(bin_dir / "curl", f'printf "%s\\n" "$@" "--" >> "{calls}"\n'
           'case "$*" in *DELETE*) ;; *) printf \'{"silenceID":"3f2a"}\' ;; esac')  # fmt: skip
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state-dir"))
    monkeypatch.setenv("ALERTMANAGER_URL", "http://am.test:9093")
    hook = tmp_path / "alertmanager-silence"
    hook.write_bytes(EXAMPLE.read_bytes())
    hook.chmod(0o755)
    return str(hook), calls


def test_the_readmes_alertmanager_hook_silences_the_guest_then_expires_the_silence(
    domain: FakeDomain, tmp_path: Path, silence_hook: tuple[str, Path]
) -> None:
    hook, calls = silence_hook

    result, _, _ = run(domain, tmp_path / "state",
                       JobHooks(before_shutdown=(hook,), after_job=(hook,)))  # fmt: skip

    assert result.outcome is Outcome.RECLAIMED, result.reason
    post, delete = (call.splitlines() for call in calls.read_text().split("--\n")[:2])
    assert post[-1] == "http://am.test:9093/api/v2/silences"
    body = post[post.index("-d") + 1]
    assert '"matchers":[{"name":"instance","value":"fake","isRegex":false' in body
    assert f"offline reclaim, job {result.job_id}" in body
    assert delete[-1] == "http://am.test:9093/api/v2/silence/3f2a"
    assert not (tmp_path / "state-dir" / "silences" / result.job_id).exists()


def test_the_alertmanager_hook_that_cannot_post_keeps_the_guest_up(
    domain: FakeDomain, tmp_path: Path, silence_hook: tuple[str, Path]
) -> None:
    hook, _calls = silence_hook
    script(tmp_path / "bin" / "curl",
           "echo 'curl: (22) The requested URL returned error: 500' >&2\nexit 22")  # fmt: skip

    result, _, _ = run(domain, tmp_path / "state",
                       JobHooks(before_shutdown=(hook,), after_job=(hook,)))  # fmt: skip

    assert result.outcome is Outcome.SKIPPED
    assert result.reason.startswith(
        f"before_shutdown hook {hook}: exited with status 22: curl: (22) The requested URL "
        "returned error: 500"
    )
    assert domain.power is DomainState.RUNNING
