"""What the live sequence covers, asked of the host and of each disk before anything changes.

The live mode's moves (an external snapshot, a shallow block copy with TRANSIENT_JOB,
an active commit, pivots that also update the persistent definition) were verified on
libvirt 9.0 with QEMU 7.2 (README.md, "Live mode"). They rely on libvirt driving QEMU's disks
as named block nodes (``-blockdev``: libvirt 5.10 with QEMU 4.2 and later); below the
floors here the same calls take older code paths that this sequence was never run on,
so the job is refused rather than tried on a running guest.
"""

from __future__ import annotations

from virt_reclaim.job.context import DiskWork
from virt_reclaim.job.ports import LiveDomainPort
from virt_reclaim.model import HostVersions, version_text

MIN_LIBVIRT = 6_000_000
MIN_QEMU = 5_001_000


def host_refusal(versions: HostVersions) -> str | None:
    """Why this host's libvirt or QEMU cannot run the live sequence, or None when they can."""
    old = []
    if versions.libvirt < MIN_LIBVIRT:
        old.append(f"libvirt {version_text(versions.libvirt)} (needs {version_text(MIN_LIBVIRT)})")
    if versions.qemu < MIN_QEMU:
        old.append(f"QEMU {version_text(versions.qemu)} (needs {version_text(MIN_QEMU)})")
    if not old:
        return None
    return f'live mode: {" and ".join(old)} too old for it; use mode = "offline"'


def disk_refusal(domain: LiveDomainPort, disk: DiskWork) -> str | None:
    """Why the live sequence cannot take ``disk`` of the running ``domain``, or None.

    Raises:
        VirtError: libvirt cannot say whether a block job runs on the disk.
    """
    if disk.info.backing_filename:
        return "it has a backing file; live mode covers single-image disks (use offline)"
    busy = domain.block_job(disk.target)
    if busy is not None:
        # Someone else's copy, commit or backup: ours would fail on it, or end it.
        return f"a {busy.type} block job is already running on it; live mode waits for it to end"
    return None
