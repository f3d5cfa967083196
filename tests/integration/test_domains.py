"""`virt-reclaim domains` against the real libvirtd with real guests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from testbed.content import Content
from testbed.guests import URI, Guest

pytestmark = pytest.mark.guest


def domains_json() -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "virt_reclaim", "domains", "--json", "--connect", URI],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return {d["name"]: d for d in json.loads(result.stdout)}


def qemu_img_info(path: str) -> dict[str, Any]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def test_running_guest_sizes_and_agent(make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(data_size="768M", content=Content(random={"r.bin": 24}))

    # libvirt learns of the agent's port from a QEMU event; wait for it with a deadline.
    deadline = time.monotonic() + 30
    while not (entry := domains_json()[guest.name])["agent_connected"]:
        assert time.monotonic() < deadline, "agent never shown as connected"
        time.sleep(0.5)

    assert (entry["state"], entry["persistent"]) == ("running", True)
    # Its disk passes discards and its agent allows guest-fstrim: a trim frees the space.
    assert entry["free_space"] == "trim"
    [disk] = entry["disks"]
    info = qemu_img_info(str(guest.data_image))
    assert disk["source"] == str(guest.data_image)
    assert (disk["type"], disk["format"], disk["target"]) == ("file", "qcow2", "vda")
    assert disk["virtual_size"] == info["virtual-size"] == 768 * 1024 * 1024
    assert disk["allocated_bytes"] == os.stat(guest.data_image).st_blocks * 512
    assert abs(disk["allocated_bytes"] - info["actual-size"]) < 1024 * 1024
    assert disk["allocated_bytes"] >= 24 * 1024 * 1024
    assert disk["internal_snapshots"] == 0
    assert disk["backing_chain"] == []


def test_stopped_overlay_and_internal_snapshots(make_guest: Callable[..., Guest]) -> None:
    overlay = make_guest(data_size="128M", backing=True, start=False)
    snapshotted = make_guest(data_size="128M", start=False)
    subprocess.run(
        ["qemu-img", "snapshot", "-c", "before-upgrade", str(snapshotted.data_image)],
        check=True,
        timeout=60,
    )

    found = domains_json()

    entry = found[overlay.name]
    assert (entry["state"], entry["agent_connected"]) == ("shutoff", False)
    [disk] = entry["disks"]
    assert disk["backing_chain"] == [{"path": str(overlay.backing_image), "format": "qcow2"}]
    assert disk["virtual_size"] == 128 * 1024 * 1024
    assert disk["allocated_bytes"] == os.stat(overlay.data_image).st_blocks * 512
    assert disk["internal_snapshots"] == 0
    assert found[snapshotted.name]["disks"][0]["internal_snapshots"] == 1


def test_transient_domain_is_reported_as_such(make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(data_size="64M", persistent=False)
    assert domains_json()[guest.name]["persistent"] is False
