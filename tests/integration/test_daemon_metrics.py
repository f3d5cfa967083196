"""The metrics file of a real daemon run: it parses, matches the journal, survives a restart.

One daemon run reclaims an idle guest in the window it finds open at its start and
skips a shut-off guest that is not eligible (an internal snapshot); then the daemon
restarts, and ``virt-reclaim run`` writes the same file. ``plan`` beforehand shows
the idle guest's reclaimable space with its policy's total.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testbed.content import Content
from testbed.daemon import DaemonProcess, daemon_toml, write_config
from testbed.guests import Guest

pytestmark = pytest.mark.guest

MIB = 1024 * 1024
WINDOW_WAIT_S = 30  # cron "* * * * *", 10 min: found open at the start, opened after 5 s
JOB_S = 180
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def cli(config_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "virt_reclaim", *args, "--config-dir", str(config_dir)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def read(path: Path) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def wait_for(path: Path, ready: Callable[[Samples], bool], timeout: float = 60) -> Samples:
    """The file once ``ready`` holds for what it says (the daemon writes on its own thread)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = read(path) if path.exists() else {}
        if samples and ready(samples):
            return samples
        assert time.monotonic() < deadline, f"{path}: not as expected within {timeout} s"
        time.sleep(0.2)


def ours(samples: Samples, domains: set[str]) -> Samples:
    """The series that are this test's: of its own domains, or of no domain at all.

    The daemon reports every domain of the shared libvirtd, and other tests' guests
    come and go while this one runs; their series are theirs to assert.
    """
    wanted = {None, *domains}
    return {key: value for key, value in samples.items() if dict(key[1]).get("domain") in wanted}


def epoch(iso: str) -> float:
    return dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def test_the_daemon_writes_metrics_that_match_the_journal_and_survive_a_restart(
    make_guest: Callable[..., Guest], daemons: list[DaemonProcess], tmp_path: Path
) -> None:
    idle = make_guest(data_size="128M", discard=True,
                      content=Content(text={"app.log": 8}, deleted_mib=24))  # fmt: skip
    snapped = make_guest(data_size="64M", start=False)
    own = {idle.name, snapped.name}
    subprocess.run(["qemu-img", "snapshot", "-c", "before", str(snapped.data_image)], check=True)
    prom = tmp_path / "node-exporter" / "virt_reclaim.prom"
    prom.parent.mkdir()
    policy = {
        "name": '"nightly"',
        "match.names": f'["{idle.name}", "{snapped.name}"]',
        "schedule.cron": '"* * * * *"',
        "schedule.window": '"10m"',
        "idle.duration": '"5s"',
        "idle.cpu_percent": "30",  # a TCG guest's timers alone take a few percent
        "shutdown.timeout": '"60s"',
        "rewrite.min_gain": '"0"',
    }
    config_dir = write_config(
        tmp_path / "etc",
        daemon_toml(tmp_path / "state", metrics_file=f'"{prom}"'),
        {"10-nightly.toml": "[[policy]]\n" + "".join(f"{k} = {v}\n" for k, v in policy.items())},
    )

    # Before any window: plan shows where the space is, per disk and per policy.
    plan = cli(config_dir, "plan")
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{idle.name} ("))
    assert "would-reclaim" in lines[at], plan.stdout
    disk_line = next(line for line in lines[at + 1 :] if line.startswith("  vda  "))
    assert re.search(r"estimated after \([0-9.]+ MiB reclaimable\)$", disk_line), disk_line
    [total] = [line for line in lines if line.startswith("  nightly: ")]
    assert re.match(r"  nightly: [0-9.]+ MiB in 1 of 2 domain\(s\)", total), total

    first = DaemonProcess(config_dir)
    daemons.append(first)
    first.wait_event("window.opened", WINDOW_WAIT_S, policy="nightly")
    finished = first.wait_event("job.finished", JOB_S, domain=idle.name, dry_run=None)
    first.wait_event("job.ended", 30, domain=idle.name)
    skipped = first.wait_event("domain.skipped", 30, domain=snapped.name)
    assert finished["outcome"] == "reclaimed", first.tail()
    assert "internal snapshot" in skipped["reason"], skipped
    reclaimed = ("virt_reclaim_jobs_total", (("domain", idle.name), ("outcome", "reclaimed")))
    samples = wait_for(prom, lambda s: s.get(reclaimed) == 1)

    # The counters are the journal's.
    history = json.loads(cli(config_dir, "history", "--json").stdout)
    [job] = [j for j in history if j["domain"] == idle.name]
    for domain in (idle.name, snapped.name):
        for outcome in ("reclaimed", "failed", "skipped", "abandoned", "nothing-to-do"):
            count = sum(1 for j in history if (j["domain"], j["outcome"]) == (domain, outcome))
            assert value(samples, "virt_reclaim_jobs_total", domain=domain, outcome=outcome) == (
                count
            )
    freed = job["bytes_before"] - job["bytes_after"]
    assert freed > 16 * MIB
    assert value(samples, "virt_reclaim_reclaimed_bytes_total", domain=idle.name) == freed
    assert (
        value(samples, "virt_reclaim_last_job_duration_seconds", domain=idle.name)
        == (job["duration_s"])
    )
    assert (
        value(samples, "virt_reclaim_last_job_downtime_seconds", domain=idle.name)
        == (job["downtime_s"])
    )
    ended_at = value(samples, "virt_reclaim_last_job_timestamp_seconds", domain=idle.name)
    assert abs(ended_at - epoch(job["finished_at"])) < 1
    steps = {
        labels[1][1]
        for (name, labels), _v in samples.items()
        if name == "virt_reclaim_last_job_step_duration_seconds" and labels[0][1] == idle.name
    }
    assert steps == set(job["steps"]) - {"shutdown-requested"}
    assert value(samples, "virt_reclaim_step_duration_seconds_count", step="rewrite") == 1
    # The disks, the daemon's own figures, the guest's state.
    vda = {"domain": idle.name, "target": "vda"}
    assert value(samples, "virt_reclaim_disk_last_reclaimed_bytes", **vda) == job["bytes_after"]
    assert value(samples, "virt_reclaim_disk_virtual_bytes", **vda) == 128 * MIB
    assert value(samples, "virt_reclaim_disk_allocated_bytes", **vda) > 0
    assert value(samples, "virt_reclaim_disk_reclaimable_bytes", **vda) == 0
    assert value(samples, "virt_reclaim_domain_running", domain=idle.name) == 1
    assert value(samples, "virt_reclaim_last_job_guest_should_run", domain=idle.name) == 1
    assert value(samples, "virt_reclaim_domain_running", domain=snapped.name) == 0
    assert value(samples, "virt_reclaim_windows_opened_total", policy="nightly") >= 1
    skips = "virt_reclaim_domain_skips_total"
    assert value(samples, skips, domain=snapped.name, reason="not-eligible") >= 1
    assert time.time() - value(samples, "virt_reclaim_last_sample_timestamp_seconds") < 120
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    assert sorted(p.name for p in prom.parent.iterdir()) == [prom.name]

    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0, first.tail()
    before = read(prom)  # its last write, at its stop

    # A restart: the journal's counters and the daemon's own go on from where they were.
    second = DaemonProcess(config_dir)
    daemons.append(second)
    second.wait_event("daemon.started", 60)
    started = before[("virt_reclaim_daemon_start_time_seconds", ())]
    after = wait_for(prom, lambda s: s[("virt_reclaim_daemon_start_time_seconds", ())] > started)
    for key, old in ours(before, own).items():
        if key[0].endswith(("_total", "_count")):
            assert key in after, f"{key} vanished at the restart"
            assert after[key] >= old, (key, old, after[key])
    assert after[reclaimed] == 1
    second.signal(signal.SIGTERM)
    assert second.wait_exit() == 0, second.tail()
    kept = read(prom)

    # `run` writes the same file: its job counted, the daemon's figures kept.
    run = cli(config_dir, "run", snapped.name, "--json", "--log-format", "json")
    assert run.returncode == 3, run.stderr  # skipped: the internal snapshot
    samples = read(prom)
    assert value(samples, "virt_reclaim_jobs_total", domain=snapped.name, outcome="skipped") == 1
    for key in [k for k in ours(kept, own) if k[0] in ("virt_reclaim_windows_opened_total", skips)]:
        assert samples[key] == kept[key], key
    assert samples[reclaimed] == 1
    assert idle.is_running()
