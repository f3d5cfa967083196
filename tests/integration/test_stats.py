"""The statistics idle detection reads, from the real libvirtd and a real guest."""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Callable

import pytest

from testbed import data
from testbed.guests import URI, Guest
from virt_reclaim.service.idle import StatsSample, sample_from_stats
from virt_reclaim.virt.connection import Hypervisor

pytestmark = pytest.mark.guest

MIB = 1024 * 1024


def sample_of(hypervisor: Hypervisor, name: str) -> StatsSample:
    for domain, _uuid, record in hypervisor.domain_stats():
        if domain == name:
            return sample_from_stats(record, time.monotonic())
    raise AssertionError(f"{name} not in the statistics")


def test_one_call_gives_counters_that_move_with_the_guest(make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(data_size="256M")
    with Hypervisor(URI, read_only=True) as hypervisor:
        before = sample_of(hypervisor, guest.name)
        data.write_random(guest, "/data/r.bin", 24)
        after = sample_of(hypervisor, guest.name)
    assert before.cpu_ns is not None and after.cpu_ns is not None
    assert after.cpu_ns > before.cpu_ns
    assert before.block_bytes is not None and after.block_bytes is not None
    assert after.block_bytes - before.block_bytes >= 24 * MIB
    # The test guest has no network interface: zero interfaces, zero bytes.
    assert before.net_bytes == after.net_bytes == 0


def utmp_login(user: str, line: str, pid: int) -> bytes:
    """One glibc x86-64 utmp record (384 bytes) of a USER_PROCESS: a login, as login(1) writes."""
    user_process = 7
    return struct.pack(
        "<hxxi32s4s32s256shhiii16s20s",
        user_process, pid, line.encode(), line[-4:].encode(), user.encode(), b"", 0, 0,
        0, int(time.time()), 0, b"", b"",
    )  # fmt: skip


def test_the_agent_tells_who_is_logged_in(make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(data_size="64M")
    with Hypervisor(URI) as hypervisor:
        domain = hypervisor.domain_by_uuid(guest.dom.UUIDString())
        assert domain.logged_in_users() == []
        record = utmp_login("alice", "pts/0", 1)
        guest.exec(f"mkdir -p /var/run && echo {base64.b64encode(record).decode()} "
                   "| base64 -d > /var/run/utmp")  # fmt: skip
        assert domain.logged_in_users() == ["alice"]
