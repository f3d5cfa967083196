"""`virt-reclaim plan` against the real libvirtd and real guests: policies, sizes, skip reasons."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from apscheduler.triggers.cron import CronTrigger

from testbed import data
from testbed.content import Content
from testbed.guests import URI, Guest
from testbed.reclaim import sha256_file

pytestmark = pytest.mark.guest


def write_policies(folder: Path, text: str) -> Path:
    policies = folder / "policies.d"
    policies.mkdir(parents=True)
    for path in (folder, policies):
        path.chmod(0o755)
    (policies / "test.toml").write_text(text)
    (policies / "test.toml").chmod(0o644)
    return folder


def plan(config_dir: Path) -> dict[str, dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "virt_reclaim", "plan", "--json", "--connect", URI,
         "--config-dir", str(config_dir)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return {entry["domain"]: entry for entry in json.loads(proc.stdout)}


def test_plan_shows_policy_next_run_sizes_and_skip_reasons(
    make_guest: Callable[..., Guest], tmp_path: Path
) -> None:
    dirty = make_guest(data_size="512M", content=Content(text={"app.log": 16}, deleted_mib=48))
    used = data.used_bytes(dirty)
    snapshotted = make_guest(data_size="64M", start=False)
    subprocess.run(["qemu-img", "snapshot", "-c", "s", str(snapshotted.data_image)],
                   check=True, timeout=60)  # fmt: skip
    small_gain = make_guest(data_size="64M", start=False)
    unmatched = make_guest(data_size="64M", start=False)
    dirty.exec("sync")
    hashes = {g.name: sha256_file(g.data_image) for g in (dirty, snapshotted, small_gain)}
    config_dir = write_policies(
        tmp_path / "etc",
        f"""
[[policy]]
name = "nightly"
match.names = ["{dirty.name}", "{snapshotted.name}"]
schedule.cron = "15 3 * * *"
schedule.timezone = "Europe/Berlin"
rewrite.min_gain = "8MiB"

[[policy]]
name = "picky"
priority = 5
match.uuids = ["{small_gain.dom.UUIDString()}"]
schedule.cron = "0 4 1 * *"
""",
    )

    entries = plan(config_dir)

    now = dt.datetime.now(dt.UTC)
    nightly = CronTrigger.from_crontab("15 3 * * *", timezone="Europe/Berlin")
    entry = entries[dirty.name]
    assert (entry["policy"], entry["outcome"], entry["state"]) == (
        "nightly",
        "would-reclaim",
        "running",
    )
    assert dt.datetime.fromisoformat(entry["next_run"]) == nightly.get_next_fire_time(None, now)
    [disk] = entry["disks"]
    assert disk["path"] == str(dirty.data_image)
    assert disk["bytes_allocated"] == os.stat(dirty.data_image).st_blocks * 512
    # 16 MiB of text compress to a few MiB; the trim frees the 48 MiB deleted.
    assert 0 < disk["estimated_after"] < used < disk["bytes_allocated"] - 40 * 1024 * 1024
    assert entry["free_space"] == "trim (every disk passes discards through)"

    entry = entries[snapshotted.name]
    assert (entry["policy"], entry["outcome"]) == ("nightly", "skipped")
    assert "internal snapshot" in entry["skipped_disks"][0]["reason"]

    # Off without an agent: nothing is known to be free, and compression alone gains
    # less than the minimum: it says so instead of shutting nothing down for nothing.
    entry = entries[small_gain.name]
    assert (entry["policy"], entry["outcome"]) == ("picky", "nothing-to-do")
    assert "below the minimum" in entry["reason"]

    entry = entries[unmatched.name]
    assert (entry["policy"], entry["outcome"], entry["next_run"]) == (None, "no-policy", None)
    assert entry["reason"] == "no enabled policy selects it"

    # It changed nothing.
    assert dirty.is_running() and snapshotted.is_off() and small_gain.is_off()
    assert {g.name: sha256_file(g.data_image) for g in (dirty, snapshotted, small_gain)} == hashes
