"""How much a zero-fill may write, worked out before it starts, so that it never fills the host.

A guest writing zeros makes QEMU allocate them (unless the disk turns zeros
into holes, ``detect_zeroes``): each byte the fill writes may add a byte to the
image on the host, up to the disk's virtual size. So the fill gets a byte limit
per guest filesystem, the least of:
- the host filesystem's room: free bytes, less the reserve (the larger of a share
  of its size and a fixed amount), less what the rewrite that follows will need
  there; disks on the same host filesystem share it;
- the disk's own headroom (virtual size minus what is allocated);
- the guest filesystem's free space, less a share left to the guest so that its
  own services never see a full disk while the fill runs.
While the fill runs, ``watch.FillWatch`` stops it the moment any host filesystem falls
below its reserve plus the rewrite's need (another guest may be writing too).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from virt_reclaim.units import GIB, MIB

# A fill below this frees too little to be worth a guest-exec.
MIN_FILL_BYTES = 64 * MIB
# What the rewrite's own preflight asks beyond qemu-img measure.
REWRITE_MARGIN = 64 * MIB


@dataclass(frozen=True)
class Reserve:
    """What a fill must leave free: on each host filesystem, and in each guest filesystem."""

    host_percent: float = 5.0
    host_min_bytes: int = 2 * GIB
    guest_percent: float = 5.0

    def host_bytes(self, filesystem_size: int) -> int:
        """The reserve of a host filesystem of ``filesystem_size`` bytes."""
        return max(int(filesystem_size * self.host_percent / 100), self.host_min_bytes)


@dataclass(frozen=True)
class HostFilesystem:
    """A host filesystem that holds images: its device id, a folder on it, its space."""

    device: int
    folder: str
    free: int  # bytes an unprivileged writer may still use
    size: int


def host_filesystem(folder: str) -> HostFilesystem:
    """The filesystem of ``folder`` as it is now."""
    st = os.statvfs(folder)
    return HostFilesystem(
        device=os.stat(folder).st_dev,
        folder=folder,
        free=st.f_bavail * st.f_frsize,
        size=st.f_blocks * st.f_frsize,
    )


@dataclass(frozen=True)
class DiskRoom:
    """A disk being reclaimed, as the fill budget sees it."""

    target: str
    host: HostFilesystem
    headroom: int  # virtual size minus allocated: the most the image can still grow
    zeros_become_holes: bool  # detect_zeroes on the disk: zeros written allocate nothing
    rewrite_need: int  # bytes the rewrite will need on the same host filesystem


@dataclass(frozen=True)
class GuestVolume:
    """A guest filesystem on the disks being reclaimed (from guest-get-fsinfo)."""

    mountpoint: str
    targets: tuple[str, ...]
    total: int | None  # bytes available to unprivileged users in all (qemu-ga's total-bytes)
    used: int | None
    fstype: str = ""


@dataclass(frozen=True)
class Fill:
    """What one guest filesystem may receive: ``limit`` bytes of zeros (0: not filled, why)."""

    mountpoint: str
    limit: int
    guest_free: int
    why_not: str | None = None
    unreached: int = 0  # free space the fill will not reach: the guest's share, a root reserve


@dataclass
class FillBudget:
    """The limits of a zero-fill and the thresholds its watch enforces."""

    fills: list[Fill] = field(default_factory=list)
    # device -> (folder, bytes that must stay free: reserve + rewrite need)
    floors: dict[int, tuple[str, int]] = field(default_factory=dict)

    @property
    def total_limit(self) -> int:
        """Bytes the fill may write in all."""
        return sum(f.limit for f in self.fills)

    def reach(self) -> float:
        """Share of the guests' free space the fill will reach (0-1), for the estimate."""
        free = sum(f.guest_free for f in self.fills)
        return min(1.0, self.total_limit / free) if free else 0.0


def fill_limits(
    disks: Sequence[DiskRoom], volumes: Sequence[GuestVolume], reserve: Reserve
) -> FillBudget:
    """Work out each guest filesystem's byte limit (see the module docstring)."""
    budget = FillBudget()
    room_by_device: dict[int, int] = {}
    for disk in disks:
        host = disk.host
        if host.device not in room_by_device:
            floor = reserve.host_bytes(host.size)
            budget.floors[host.device] = (host.folder, floor)
            room_by_device[host.device] = host.free - floor
        folder, floor = budget.floors[host.device]
        need = disk.rewrite_need + REWRITE_MARGIN
        budget.floors[host.device] = (folder, floor + need)
        room_by_device[host.device] -= need
    headroom = {d.target: d for d in disks}
    for volume in volumes:
        mine = [headroom[t] for t in volume.targets if t in headroom]
        guest_free = _guest_room(volume, reserve)
        unreached = _unreached(volume, guest_free)
        if not mine:
            continue
        others = [t for t in volume.targets if t not in headroom]
        if others:
            # LVM, md or btrfs over a disk this job leaves alone: zeros would grow its image
            # with no budget and no watch.
            why = (f"it spans {', '.join(others)} too, which this job does not rewrite: the "
                   "zeros would grow that image unplanned")  # fmt: skip
            budget.fills.append(Fill(volume.mountpoint, 0, guest_free, why, unreached + guest_free))
            continue
        if volume.total is None or volume.used is None:
            budget.fills.append(Fill(volume.mountpoint, 0, 0, "the agent did not report its size"))
            continue
        # The guest decides which of its disks the zeros land on: all of them may land on
        # any one, so the limit must fit beside each disk that can grow.
        limit, bound_by = guest_free, mine[0]
        for disk in mine:
            room = max(0, room_by_device[disk.host.device])
            if not disk.zeros_become_holes and disk.headroom > room and room < limit:
                # The image cannot grow past its virtual size: zeros written over clusters
                # it already holds (the deleted data, typically) cost the host nothing.
                limit, bound_by = room, disk
        limit = limit // MIB * MIB  # dd writes whole MiB
        if limit < MIN_FILL_BYTES:
            why = _why_not(bound_by, guest_free)
            budget.fills.append(Fill(volume.mountpoint, 0, guest_free, why, unreached + guest_free))
            continue
        growing = [d for d in mine if not d.zeros_become_holes]
        for device in {d.host.device for d in growing}:
            on_device = [d for d in growing if d.host.device == device]
            room_by_device[device] -= min(limit, sum(d.headroom for d in on_device))
        for disk in growing:
            headroom[disk.target] = DiskRoom(disk.target, disk.host,
                                             max(0, disk.headroom - limit), False,
                                             disk.rewrite_need)  # fmt: skip
        budget.fills.append(
            Fill(volume.mountpoint, limit, guest_free, None, unreached + guest_free - limit)
        )
    return budget


# ext2/3/4 keep 5 % for root by default, which qemu-ga's total-bytes already leaves out.
EXT_ROOT_RESERVE_PERCENT = 5.0


def _has_root_reserve(volume: GuestVolume) -> bool:
    return volume.fstype in ("ext2", "ext3", "ext4")


def _guest_room(volume: GuestVolume, reserve: Reserve) -> int:
    """The guest's free space less its share; on ext* the root reserve counts toward it."""
    if volume.total is None or volume.used is None:
        return 0
    percent = reserve.guest_percent
    if _has_root_reserve(volume):
        percent = max(0.0, percent - EXT_ROOT_RESERVE_PERCENT)
    left = int(volume.total * percent / 100)
    return max(0, volume.total - volume.used - left)


def _unreached(volume: GuestVolume, guest_free: int) -> int:
    """Free space no fill of this filesystem reaches: the guest's share and a root reserve."""
    if volume.total is None or volume.used is None:
        return 0
    share = max(0, volume.total - volume.used - guest_free)
    if _has_root_reserve(volume):
        share += int(volume.total * EXT_ROOT_RESERVE_PERCENT / (100 - EXT_ROOT_RESERVE_PERCENT))
    return share


def _why_not(disk: DiskRoom, guest_free: int) -> str:
    if guest_free < MIN_FILL_BYTES:
        return "the guest filesystem has too little free space beyond its share"
    if disk.headroom < MIN_FILL_BYTES:
        return "the image is already allocated up to its virtual size"
    return (
        f"no room on the host filesystem of {disk.host.folder} above its reserve "
        "and what the rewrite needs"
    )


def below_floor(budget: FillBudget) -> str | None:
    """Why the fill must stop now (a host filesystem under its floor), or None."""
    for folder, floor in budget.floors.values():
        free = host_filesystem(folder).free
        if free < floor:
            return (
                f"the host filesystem of {folder} has {free} bytes free, below the "
                f"{floor} the reserve and the rewrite need"
            )
    return None
