"""Guests that start in a second: restored from a running state saved once per test-bed build.

Booting under TCG is most of the suite's time: the busybox guest needs 4 s to its
agent, the Debian guest 35-50 s. ``virsh restore`` of a saved guest takes under a
second. libvirt restores a save image only as the domain it was saved from (its
ABI check refuses another UUID in ``restoreFlags``' XML), while each test needs a
domain of its own, under its own name and UUID, on its own disk. So each restore
gets its own copy of the save image whose header carries the new domain's XML:
the header is libvirt's ``virQEMUSaveHeader`` (magic, version, data length, was
running, compressed, cookie offset, 14 unused words), then the XML with a NUL,
then the cookie, padded with zeros to the data length; the migration stream that
follows is left as it was.

What the saved guest's memory knows of its disk must hold for the new domain:
- busybox: the state is saved before the guest loads its disk driver
  (``vr.defer_disk`` on its command line), and ``/sbin/attach-disk`` probes the
  test's own disk after the restore, whatever its size, format and content;
- Debian: the root filesystem is mounted, so each guest gets a copy of the disk
  as it was at the save, which is kept beside the state.

A cold start (``Guest.start``, or a job restarting the guest) boots as before.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

_HEADER = struct.Struct("<16s19I")
_MAGIC = b"LibvirtQemudSave"
_XML_FLAGS = (
    libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    | libvirt.VIR_DOMAIN_XML_MIGRATABLE
)  # fmt: skip
# Bumped when what a saved state holds changes, so that older ones are made again.
_FORMAT = "2"
DEFER_DISK = "vr.defer_disk"


@dataclass(frozen=True)
class SavedState:
    """A running guest saved once: ``state`` (libvirt's save image), maybe its ``disk``."""

    folder: Path

    @property
    def state(self) -> Path:
        return self.folder / "state"

    @property
    def disk(self) -> Path:
        return self.folder / "disk.qcow2"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (xdist workers build a state once between them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_saved(folder: Path, build_stamp: Path, save: Callable[[SavedState], None]) -> SavedState:
    """The state saved in ``folder``, made by ``save`` unless one for this build is there.

    ``build_stamp`` is the stamp of the guest's build: a rebuilt guest gets a new state.
    """
    saved = SavedState(folder)
    want = f"{_FORMAT}:{build_stamp.read_text().strip()}"
    stamp = saved.folder / "stamp"
    with _locked(saved.folder.with_suffix(".lock")):
        if stamp.exists() and stamp.read_text() == want and saved.state.exists():
            return saved
        shutil.rmtree(saved.folder, ignore_errors=True)
        saved.folder.mkdir(parents=True)
        save(saved)
        stamp.write_text(want)
    return saved


def save_running(dom: Any, saved: SavedState) -> None:
    """Save the running domain ``dom`` into ``saved`` (it is shut off afterwards)."""
    partial = saved.state.with_suffix(".partial")
    dom.save(str(partial))
    partial.rename(saved.state)


def restore_as(conn: Any, dom: Any, saved: SavedState, copy: Path) -> None:
    """Start the defined domain ``dom`` from ``saved``, as itself (name, UUID, disk).

    ``copy`` is where the domain's own copy of the save image goes; it is removed
    once QEMU has read it.
    """
    xml = dom.XMLDesc(_XML_FLAGS)
    _copy_with_xml(saved.state, copy, xml)
    try:
        conn.restoreFlags(str(copy), None, libvirt.VIR_DOMAIN_SAVE_RUNNING)
    finally:
        copy.unlink(missing_ok=True)


def _copy_with_xml(source: Path, target: Path, xml: str) -> None:
    """Copy a save image with the domain XML in its header replaced by ``xml``."""
    with source.open("rb") as src:
        head = src.read(_HEADER.size)
        magic, version, data_len, was_running, compressed, cookie_at, *unused = _HEADER.unpack(head)
        if magic != _MAGIC or version != 2:
            raise ValueError(f"{source}: not a libvirt QEMU save image of version 2")
        data = src.read(data_len)
        cookie = data[cookie_at:].rstrip(b"\0")
        body = xml.encode() + b"\0"
        new_data = body + cookie
        if len(new_data) > data_len:
            raise ValueError(f"{source}: the new XML does not fit in the header's {data_len} B")
        new_data += b"\0" * (data_len - len(new_data))
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(
                _HEADER.pack(magic, version, data_len, was_running, compressed, len(body), *unused)
            )
            out.write(new_data)
            shutil.copyfileobj(src, out, 8 * 1024 * 1024)


def without_deferred_disk(xml: str) -> str:
    """The domain XML with ``vr.defer_disk`` taken off the kernel command line."""
    return re.sub(rf"\s*{re.escape(DEFER_DISK)}", "", xml)


def set_guest_clock(agent: Callable[..., Any]) -> None:
    """Set the restored guest's clock to the host's (it resumes at the time of the save)."""
    try:
        agent("guest-set-time", {"time": time.time_ns()})
    except libvirt.libvirtError as exc:
        # The agent sets the clock, then copies it to the RTC with hwclock, which a
        # minimal guest may lack: the clock is set all the same.
        if "hwclock" not in str(exc):
            raise
