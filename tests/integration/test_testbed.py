"""The test bed itself: guests boot, the agent answers, data survives a restart, profiles work."""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable

import libvirt
import pytest

from testbed import content, data
from testbed.guests import Guest, create_guest, remove_domain, sweep_leftovers

pytestmark = pytest.mark.guest

MIB = 1024 * 1024


def host_allocated(guest: Guest) -> int:
    return os.stat(guest.data_image).st_blocks * 512


def test_guest_boots_agent_answers_and_data_survives_a_restart(
    make_guest: Callable[..., Guest],
) -> None:
    guest = make_guest(data_size="512M")
    assert guest.is_running()
    assert guest.exec("cat /proc/mounts").stdout.count(" /data ext4 ") == 1
    data.write_text(guest, "/data/log.txt", 8)
    data.write_random(guest, "/data/random.bin", 4)
    before = data.checksums(guest)
    assert set(before) == {"/data/log.txt", "/data/random.bin"}
    assert data.used_bytes(guest) >= 12 * MIB

    guest.restart()

    assert data.checksums(guest) == before


def test_two_guests_restored_from_one_saved_state_are_each_their_own(
    make_guest: Callable[..., Guest],
) -> None:
    """Each restored guest has its own name, UUID, disk size and data; a cold start boots it."""
    small = make_guest(data_size="64M")
    large = make_guest(data_size="1G", backing=True)
    assert small.dom.UUIDString() != large.dom.UUIDString()
    for guest, size in ((small, 64 * MIB), (large, 1024 * MIB)):
        assert guest.dom.state()[1] == libvirt.VIR_DOMAIN_RUNNING_RESTORED
        assert int(guest.exec("cat /sys/class/block/vda/size").stdout) * 512 == size
        assert abs(float(guest.exec("date +%s").stdout) - time.time()) < 30
        assert str(guest.data_image) in guest.dom.XMLDesc(0)
    data.write_text(small, "/data/small.txt", 1)
    assert large.exec("ls /data").stdout.split() == ["lost+found"]

    small.restart()

    assert small.dom.state()[1] == libvirt.VIR_DOMAIN_RUNNING_BOOTED
    assert "vr.defer_disk" not in small.exec("cat /proc/cmdline").stdout
    assert set(data.checksums(small)) == {"/data/small.txt"}


def test_deleted_random_data_stays_allocated_until_trimmed(
    make_guest: Callable[..., Guest],
) -> None:
    guest = make_guest(data_size="512M", discard=True)
    empty = host_allocated(guest)
    data.write_deleted_random(guest, 48)
    assert host_allocated(guest) >= empty + 40 * MIB
    trimmed = guest.agent("guest-fstrim")["paths"][0]
    assert trimmed["path"] == "/data"
    assert host_allocated(guest) < empty + 8 * MIB


def test_content_made_on_the_host_is_what_the_guest_reads_and_its_deleted_data_is_free(
    make_guest: Callable[..., Guest],
) -> None:
    """testbed.content stands in for writes in the guest: the same files, the same garbage."""
    files = content.Content(text={"app.log": 4}, random={"blob.bin": 2}, deleted_mib=48)
    guest = make_guest(data_size="512M", discard=True, content=files)
    assert data.checksums(guest) == guest.content_sums
    assert set(guest.content_sums) == {"/data/app.log", "/data/blob.bin"}
    assert data.used_bytes(guest) < 12 * MIB, "the deleted data is free in the filesystem"
    assert host_allocated(guest) >= 48 * MIB, "and allocated in the image"
    guest.agent("guest-fstrim")
    assert host_allocated(guest) < 16 * MIB


def test_without_discard_a_trim_frees_nothing_on_the_host(
    make_guest: Callable[..., Guest],
) -> None:
    guest = make_guest(data_size="512M", discard=False)
    data.write_deleted_random(guest, 32)
    dirty = host_allocated(guest)
    guest.agent("guest-fstrim")
    assert host_allocated(guest) >= dirty - MIB


def test_log_text_compresses_like_logs() -> None:
    text = content.log_text(MIB)
    assert len(text) == MIB
    assert text == content.log_text(MIB)
    assert 3 < len(text) / len(zlib.compress(text, 6)) < 10


def test_overlay_guest_writes_into_the_overlay_only(make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(data_size="256M", backing=True)
    assert guest.backing_image is not None
    base_before = guest.backing_image.read_bytes()
    data.write_random(guest, "/data/r.bin", 8)
    assert host_allocated(guest) >= 8 * MIB
    guest.shutdown()
    assert guest.backing_image.read_bytes() == base_before


def test_transient_guest_and_sweep_of_dead_runs(libvirt_conn: object) -> None:
    # A guest named after a pid that no longer lives is what a killed run leaves.
    dead_pid = 2**22 + 17
    guest = create_guest(libvirt_conn, name=f"vrt-{dead_pid}-1", data_size="64M", persistent=False)
    try:
        assert guest.is_running()
        assert not guest.dom.isPersistent()
        assert f"vrt-{dead_pid}-1" in sweep_leftovers(libvirt_conn)
        assert not guest.folder.exists()
        assert guest.is_off()
    finally:
        remove_domain(libvirt_conn, guest.name)
