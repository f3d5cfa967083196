"""What the job decides from the guest's agent and the host's space: pure functions."""

from __future__ import annotations

import pytest

from fakes import LINUX_AGENT, MIB, RHEL_AGENT, WINDOWS_AGENT
from virt_reclaim.errors import AgentUnavailable
from virt_reclaim.job.freespace.agent import STOP_FILLS_SCRIPT, choose_method, zero_fill
from virt_reclaim.job.freespace.budget import (
    DiskRoom,
    Fill,
    GuestVolume,
    HostFilesystem,
    Reserve,
    fill_limits,
)
from virt_reclaim.job.settings import FreeSpaceMethod
from virt_reclaim.model import DomainObservation, DomainState, GuestExecResult, TrimmedPath
from virt_reclaim.reports.inventory import describe_domain
from virt_reclaim.virt.agentreplies import parse_agent_info, parse_fstrim

GIB = 1024 * MIB
AUTO, TRIM, ZERO, NONE = (FreeSpaceMethod.AUTO, FreeSpaceMethod.TRIM, FreeSpaceMethod.ZERO,
                          FreeSpaceMethod.NONE)  # fmt: skip


@pytest.mark.parametrize(
    ("requested", "discard", "agent", "method", "why"),
    [
        (AUTO, True, LINUX_AGENT, TRIM, "discards"),
        (AUTO, False, LINUX_AGENT, ZERO, "zero-fill"),
        (AUTO, False, RHEL_AGENT, NONE, "guest-exec disabled"),
        (AUTO, True, RHEL_AGENT, TRIM, "discards"),
        (ZERO, False, RHEL_AGENT, NONE, "guest-exec disabled"),
        (AUTO, False, WINDOWS_AGENT, TRIM, "Windows"),
        (ZERO, True, WINDOWS_AGENT, NONE, "Windows"),
        (AUTO, True, None, NONE, "no guest agent"),
        (NONE, True, LINUX_AGENT, NONE, "none"),
        (TRIM, False, LINUX_AGENT, TRIM, "lacks discard"),
    ],
)
def test_the_method_follows_discard_and_what_the_agent_allows(
    requested: FreeSpaceMethod, discard: bool, agent: object, method: FreeSpaceMethod, why: str
) -> None:
    choice = choose_method(requested, all_disks_discard=discard, agent=agent)  # type: ignore[arg-type]
    assert (choice.method, why in choice.why) == (method, True), choice


def test_guest_info_is_read_defensively() -> None:
    info = {
        "version": "7.2.0",
        "supported_commands": [
            {"name": "guest-exec", "enabled": False, "success-response": True},
            {"name": "guest-fstrim", "enabled": True},
            {"name": 42, "enabled": True},
            "garbage",
            {"name": "guest-ping", "enabled": "yes"},
        ]
        * 300,
    }
    osinfo = {"id": "mswindows", "pretty-name": "Windows Server 2022\x1b[31m", "name": "Win"}
    agent = parse_agent_info(info, osinfo)
    assert agent.enabled == {"guest-fstrim"}
    assert agent.is_windows
    assert agent.os_name is None  # not printable: not trusted
    with pytest.raises(AgentUnavailable):
        parse_agent_info({"version": "1"}, None)
    assert parse_agent_info({"supported_commands": []}, "not an object").os_id is None


def test_fstrim_replies_of_linux_and_windows_agents() -> None:
    linux = {
        "paths": [{"path": "/", "trimmed": 123, "minimum": 0}, {"path": "/boot", "error": "x"}]
    }
    windows = {"paths": [{"path": "C:\\"}, {"path": "D:\\", "error": "The volume is not thin"}]}
    assert parse_fstrim(linux) == [TrimmedPath("/", 123, None), TrimmedPath("/boot", None, "x")]
    assert parse_fstrim(windows) == [
        TrimmedPath("C:\\", None, None),
        TrimmedPath("D:\\", None, "The volume is not thin"),
    ]
    assert parse_fstrim({"paths": [{"path": "/", "trimmed": True}] * 10_000})[0].trimmed is None
    with pytest.raises(AgentUnavailable):
        parse_fstrim({"paths": "no"})


def host(device: int, free: int, size: int = 100 * GIB) -> HostFilesystem:
    return HostFilesystem(device, f"/images{device}", free, size)


def test_two_disks_on_one_host_filesystem_share_its_room() -> None:
    shared = host(1, free=14 * GIB)
    disks = [
        DiskRoom("vda", shared, headroom=30 * GIB, zeros_become_holes=False, rewrite_need=GIB),
        DiskRoom("vdb", shared, headroom=30 * GIB, zeros_become_holes=False, rewrite_need=GIB),
    ]
    volumes = [
        GuestVolume("/", ("vda",), total=20 * GIB, used=2 * GIB),
        GuestVolume("/srv", ("vdb",), total=20 * GIB, used=2 * GIB),
    ]
    budget = fill_limits(
        disks, volumes, Reserve(host_percent=5, host_min_bytes=2 * GIB, guest_percent=5)
    )
    # 14 GiB free - 5 GiB reserve (5 % of 100 GiB) - 2 x (1 GiB + 64 MiB) for the rewrites.
    room = 14 * GIB - 5 * GIB - 2 * (GIB + 64 * MIB)
    assert budget.total_limit <= room
    assert budget.total_limit >= room - 2 * MIB
    [first, second] = budget.fills
    assert first.limit == room // MIB * MIB  # the first takes what fits...
    assert second.limit == 0 and "no room on the host" in str(second.why_not)  # ...none is left
    assert budget.floors == {1: ("/images1", 5 * GIB + 2 * (GIB + 64 * MIB))}


def test_a_filesystem_over_several_disks_is_filled_only_within_the_room_beside_each() -> None:
    """LVM, md or btrfs: the guest chooses which disk the zeros land on, all may land on one."""
    roomy = host(1, free=500 * GIB, size=1000 * GIB)
    tight = host(2, free=50 * GIB + 3 * GIB + GIB + 64 * MIB, size=1000 * GIB)
    disks = [
        DiskRoom("vda", roomy, headroom=30 * GIB, zeros_become_holes=False, rewrite_need=GIB),
        DiskRoom("vdb", tight, headroom=30 * GIB, zeros_become_holes=False, rewrite_need=GIB),
    ]
    lvm = GuestVolume("/", ("vda", "vdb"), total=20 * GIB, used=2 * GIB)

    budget = fill_limits(disks, [lvm], Reserve(guest_percent=0))

    # vdb's host has 3 GiB above its reserve and rewrite: the whole fill may land there.
    [fill] = budget.fills
    assert fill.limit == 3 * GIB
    # Both hosts count it as theirs: the watch floors stay, the next budget sees it spent.
    again = fill_limits(disks, [lvm, GuestVolume("/srv", ("vdb",), 20 * GIB, 2 * GIB)],
                      Reserve(guest_percent=0))  # fmt: skip
    assert [f.limit for f in again.fills] == [3 * GIB, 0]
    assert set(budget.floors) == {1, 2}


def test_a_filesystem_that_spans_a_disk_the_job_leaves_alone_is_not_filled() -> None:
    disks = [DiskRoom("vda", host(1, free=500 * GIB, size=1000 * GIB), 30 * GIB, False, GIB)]
    spanning = GuestVolume("/", ("vda", "vdc"), total=20 * GIB, used=2 * GIB)

    budget = fill_limits(disks, [spanning], Reserve(guest_percent=0))

    [fill] = budget.fills
    assert fill.limit == 0
    assert "spans vdc too, which this job does not rewrite" in str(fill.why_not)
    assert budget.reach() == 0.0


def test_a_fill_is_bounded_by_the_guest_share_the_headroom_and_holes() -> None:
    roomy = host(1, free=500 * GIB, size=1000 * GIB)
    volume = GuestVolume("/", ("vda",), total=10 * GIB, used=4 * GIB)
    reserve = Reserve(guest_percent=10)
    guest_bound = fill_limits([DiskRoom("vda", roomy, 30 * GIB, False, GIB)], [volume], reserve)
    assert guest_bound.fills[0].limit == 5 * GIB  # 10 - 4 - 1 (10 % left to the guest)
    # The image could grow by 30 GiB, the host has room for 2 GiB more: the fill gets 2 GiB.
    small = host(3, free=50 * GIB + 2 * GIB + GIB + 64 * MIB, size=1000 * GIB)
    tight = fill_limits([DiskRoom("vda", small, 30 * GIB, False, GIB)], [volume], reserve)
    assert tight.fills[0].limit == 2 * GIB
    full = host(2, free=GIB)
    holes = fill_limits([DiskRoom("vda", full, 30 * GIB, True, GIB)], [volume], reserve)
    assert holes.fills[0].limit == 5 * GIB  # detect_zeroes: zeros cost the host nothing
    unknown = fill_limits([DiskRoom("vda", roomy, 30 * GIB, False, GIB)],
                        [GuestVolume("/", ("vda",), None, None)], reserve)  # fmt: skip
    assert unknown.fills[0].limit == 0
    assert unknown.reach() == 0.0
    assert guest_bound.reach() == 1.0


def test_domains_reports_the_free_space_method_each_guest_allows() -> None:
    xml = """<domain><name>g</name><uuid>u</uuid><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/nonexistent/g.qcow2'/><target dev='vda'/></disk>
      <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'
       state='connected'/></channel></devices></domain>"""
    running = DomainObservation("g", "u", DomainState.RUNNING, True, xml)

    def free_space(agent: object) -> str:
        report = describe_domain(running, qemu_img_path="qemu-img", agent=agent)  # type: ignore[arg-type]
        return report.free_space

    assert free_space(LINUX_AGENT) == "zero"
    assert free_space(RHEL_AGENT).startswith("none (the agent has guest-exec disabled")
    assert free_space(WINDOWS_AGENT).startswith("trim")
    assert free_space("read-only connection") == "unknown (read-only connection)"
    off = DomainObservation("g", "u", DomainState.SHUTOFF, True, xml)
    assert describe_domain(off, qemu_img_path="qemu-img").free_space == "-"
    assert describe_domain(running, qemu_img_path="qemu-img", agent=WINDOWS_AGENT).os == "mswindows"


def test_zeros_over_what_the_image_already_holds_cost_the_host_nothing() -> None:
    # 3 GiB of room on the host, but the image can grow by 1 GiB at most: the fill may write
    # all the guest's free space (most of it lands on clusters the image already holds).
    roomy = host(1, free=2 * GIB + 3 * GIB + 2 * GIB, size=40 * GIB)
    volume = GuestVolume("/", ("vda",), total=20 * GIB, used=4 * GIB)
    budget = fill_limits(
        [DiskRoom("vda", roomy, GIB, False, GIB)], [volume], Reserve(guest_percent=0)
    )
    assert budget.fills[0].limit == 16 * GIB


class _LyingAgent:
    """An agent whose fill says it zeroed a petabyte (a guest chooses its own output)."""

    def __init__(self) -> None:
        self.scripts: list[list[str]] = []

    def guest_exec(
        self, path: str, args: list[str], timeout: float, cancel: object = None
    ) -> GuestExecResult:
        self.scripts.append(args)
        return GuestExecResult(0, None, f"zeroed {1 << 50}\n", "")

    def fstrim(self, timeout: float = 600.0) -> list[TrimmedPath]:
        raise AssertionError("a zero-fill does not trim")


def test_a_guest_claiming_more_zeros_than_the_fill_may_write_is_capped_at_the_budget() -> None:
    agent = _LyingAgent()

    result = zero_fill(agent, [Fill("/data", 64 * MIB, 900 * MIB)], timeout=60)

    [fill] = result.fills
    assert fill.zeroed_bytes == 64 * MIB
    assert agent.scripts[0][-1] == "64"  # dd's count: the budget's limit in MiB


def test_the_script_that_ends_a_dead_jobs_fill_does_not_match_itself() -> None:
    """It finds fills by the marker in command lines: its own must not carry it."""
    assert ".virt-reclaim-zero." not in STOP_FILLS_SCRIPT
