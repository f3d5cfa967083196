"""A real Debian 12 guest in the test bed: systemd, udev, Debian's own agent, root on the disk.

What the busybox guest cannot show, this one does: a partition table (vda1 ext4
root, vda2 swap), the root filesystem on the reclaimed disk, swap, systemd's
shutdown and Debian's packaged qemu-guest-agent. ``build-debian-guest.sh``
builds its disk once; each test guest boots a plain copy of it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.guests import (
    FAST_BOOT,
    RUN_DIR,
    SAVED_DIR,
    TESTBED_DIR,
    Guest,
    domain_xml,
    remove_domain,
    unique_name,
)
from testbed.saved import SavedState, ensure_saved, save_running

DEBIAN_DIR = TESTBED_DIR / "debian"
BUILD_SCRIPT = Path(__file__).with_name("build-debian-guest.sh")
# guest-ping answers 42-50 s after the start on an idle host under TCG; twice that under load.
AGENT_BOOT_TIMEOUT_S = 240.0
SHUTDOWN_TIMEOUT_S = 120.0
# Where tests put their files: on the root filesystem, which is what gets reclaimed.
DATA_DIR = "/srv/vr-data"
# Files the build put on the disk, with their SHA256SUMS beside them.
BASE_DIR = "/srv/vr-base"
ZERO_FILE = ".virt-reclaim-zero."
KERNEL_ERRORS = re.compile(r"EXT4-fs error|Buffer I/O error|I/O error")
# One extent of `filefrag -v`: "  0:   0..  2047:   202752..   204799:   2048:"; the physical range.
_FILEFRAG_EXTENT = re.compile(r"^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):", re.MULTILINE)


def ensure_debian_built() -> None:
    """Build the Debian guest's disk, kernel and initramfs unless cached (about 2 minutes)."""
    subprocess.run(["bash", str(BUILD_SCRIPT), str(TESTBED_DIR)], check=True, timeout=1800)


def debian_domain_xml(name: str, disk: Path, *, discard: bool, console_log: Path) -> str:
    """TCG, 512 MiB, one vCPU, direct kernel boot from vda1, an agent channel, serial to a file."""
    return domain_xml(
        name, disk, discard=discard, console_log=console_log, boot_dir=DEBIAN_DIR,
        cmdline=f"root=/dev/vda1 console=ttyS0 {FAST_BOOT}", memory_mib=512,
    )  # fmt: skip


@dataclass
class DebianGuest(Guest):
    """A test guest running Debian 12 from its own disk (``data_image``: root and swap)."""

    boot_s: float | None = None  # start to guest-ping of the latest start()

    def start(self, *, wait_agent: bool = True) -> None:
        started = time.monotonic()
        super().start(wait_agent=wait_agent)
        if wait_agent:
            self.boot_s = time.monotonic() - started

    def wait_agent(self, timeout: float = AGENT_BOOT_TIMEOUT_S) -> None:
        super().wait_agent(timeout)

    def attach_disk(self) -> None:
        """Nothing to do: the saved guest runs from its disk (a copy of the saved one)."""

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        super().shutdown(timeout)

    def wait_off(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        super().wait_off(timeout)

    def allocated_bytes(self) -> int:
        """What the disk image takes on the host."""
        return self.data_image.stat().st_blocks * 512

    def disk_extents(self, path: str) -> list[tuple[int, int]]:
        """Where a file in the root filesystem lies on the disk: (offset, length) in bytes."""
        start = int(self.exec("cat /sys/class/block/vda1/start").stdout)
        out = self.exec(f"filefrag -v -b512 '{path}'").stdout
        return [
            ((start + int(first)) * 512, (int(last) - int(first) + 1) * 512)
            for first, last in _FILEFRAG_EXTENT.findall(out)
        ]

    # What the guest says about its own health, read through guest-exec.

    def system_state(self, timeout: float = AGENT_BOOT_TIMEOUT_S) -> str:
        """``systemctl is-system-running --wait``: ``running`` once booted with nothing failed."""
        result = self.exec(
            f"timeout {int(timeout)} systemctl is-system-running --wait",
            timeout=timeout + 10,
            check=False,
        )
        return result.stdout.strip() or f"(exit {result.exitcode}: {result.stderr.strip()})"

    def failed_units(self) -> list[str]:
        out = self.exec("systemctl --failed --no-legend --plain").stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def active_swaps(self) -> list[str]:
        """The partitions /proc/swaps lists (the swap file would say ``file``)."""
        lines = self.exec("cat /proc/swaps").stdout.splitlines()[1:]
        return [fields[0] for fields in map(str.split, lines) if fields[1:2] == ["partition"]]

    def root_mount(self) -> tuple[str, list[str]]:
        """The device and the options / is mounted with (the last mount on / wins)."""
        mounts = [line.split() for line in self.exec("cat /proc/mounts").stdout.splitlines()]
        device, _mountpoint, _fstype, options = [m for m in mounts if m[1] == "/"][-1][:4]
        return device, options.split(",")

    def kernel_errors(self) -> list[str]:
        """Kernel log lines that tell of a damaged filesystem or a failing disk."""
        log = self.exec("dmesg").stdout.splitlines()
        return [line for line in log if KERNEL_ERRORS.search(line)]

    def zero_files(self, mountpoint: str = "/") -> list[str]:
        """Files a zero-fill left behind on ``mountpoint``."""
        return [n for n in self.exec(f"ls -a '{mountpoint}'").stdout.split() if ZERO_FILE in n]

    def base_files_intact(self) -> bool:
        """The files the build put in BASE_DIR still match their SHA256SUMS."""
        check = self.exec(f"cd {BASE_DIR} && sha256sum -c --quiet SHA256SUMS", check=False)
        return check.exitcode == 0

    def health_problems(self) -> list[str]:
        """Everything that is not as a freshly booted healthy guest has it; empty when healthy."""
        problems = []
        state = self.system_state()
        if state != "running":
            problems.append(f"systemctl is-system-running: {state}")
        if failed := self.failed_units():
            problems.append(f"failed units: {failed}")
        if "/dev/vda2" not in self.active_swaps():
            problems.append(f"swap on /dev/vda2 not active: {self.exec('cat /proc/swaps').stdout}")
        device, options = self.root_mount()
        if device != "/dev/vda1" or "rw" not in options:
            problems.append(f"/ is {device} mounted {','.join(options)}")
        if errors := self.kernel_errors():
            problems.append(f"kernel log: {errors}")
        if leftovers := self.zero_files("/"):
            problems.append(f"zero-fill files left on /: {leftovers}")
        if not self.base_files_intact():
            problems.append(f"{BASE_DIR} no longer matches its SHA256SUMS")
        return problems


def data_share(image: Path, extents: list[tuple[int, int]]) -> float:
    """The share of ``extents`` (disk offsets) that ``image`` still stores as data, 0 to 1.

    A zero-filled and rewritten or a trimmed range reads as zeros without being stored.
    """
    argv = ["qemu-img", "map", "-U", "--output=json", str(image)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
    stored = [(m["start"], m["start"] + m["length"]) for m in json.loads(out) if m["data"]]
    total = sum(length for _offset, length in extents)
    overlap = sum(
        max(0, min(offset + length, end) - max(offset, start))
        for offset, length in extents
        for start, end in stored
    )
    return overlap / total if total else 0.0


def ensure_debian_saved(conn: Any) -> SavedState:
    """The Debian guest saved once fully booted, with the disk as it was at the save.

    Made once per build of the guest (one boot, about a minute); each started test
    guest is restored from it on a copy of that disk (see testbed.saved).
    """

    def save(saved: SavedState) -> None:
        guest = create_debian_guest(conn, start=False)
        try:
            guest.start()
            state = guest.system_state()
            assert state == "running", f"{guest.name}: the guest to save is {state}"
            save_running(guest.dom, saved)
            shutil.move(guest.data_image, saved.disk)
        finally:
            remove_domain(conn, guest.name)
            guest.remove()

    return ensure_saved(SAVED_DIR / "debian", DEBIAN_DIR / "stamp", save)


def create_debian_guest(
    conn: Any, *, name: str | None = None, discard: bool = False, start: bool = True
) -> DebianGuest:
    """Define a Debian guest on a copy of the cached disk, and start it unless ``start=False``.

    Args:
        conn: An open libvirt connection.
        name: The domain name; a unique ``vrt-<pid>-<n>`` by default (swept if left over).
        discard: Give the disk ``discard='unmap'`` so that a trim frees host space.
        start: Start the guest, restored from a saved state (testbed.saved) on a copy of
            the disk saved with it; otherwise the disk is a copy of the build's.
    """
    name = name or unique_name()
    folder = RUN_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    # QEMU runs as libvirt-qemu and must reach every folder above the image.
    for path in (TESTBED_DIR, RUN_DIR, folder):
        path.chmod(0o755)
    disk = folder / "disk.qcow2"
    guest = DebianGuest(conn, name, folder, disk, None, persistent=True)
    try:
        saved = ensure_debian_saved(conn) if start else None
        shutil.copyfile(saved.disk if saved else DEBIAN_DIR / "disk.qcow2", disk)
        console_log = folder / "console.log"
        conn.defineXML(debian_domain_xml(name, disk, discard=discard, console_log=console_log))
        if saved:
            guest.resume_saved(saved)
    except BaseException:
        guest.remove()
        raise
    return guest
