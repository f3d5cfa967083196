"""Tiny real test guests on the real libvirtd: create, start, talk to their agent, remove.

The test bed talks to libvirt directly (not through virt_reclaim.virt) so that it
stays an independent witness of what the product does.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import libvirt
import libvirt_qemu

from testbed.content import DELETED_NAME, MOUNTPOINT, Content, files_in_image
from testbed.kernel import bootable_kernel
from testbed.saved import (
    DEFER_DISK,
    SavedState,
    ensure_saved,
    restore_as,
    save_running,
    set_guest_clock,
)

TESTBED_DIR = Path(os.environ.get("VR_TESTBED_DIR", "/var/lib/virt-reclaim-testbed"))
GUEST_DIR = TESTBED_DIR / "guest"
RUN_DIR = TESTBED_DIR / "run"
SAVED_DIR = TESTBED_DIR / "saved"
# Every boot under TCG costs a core for seconds, and the suite boots guests about a hundred
# times: the kernel's crypto self-tests took 1 s of the busybox guest's 3.4 s to /init
# (initcall_debug), printing to the serial console a few tenths more.
FAST_BOOT = "quiet cryptomgr.notests"
DEFAULT_CMDLINE = f"console=ttyS0 panic=-1 {FAST_BOOT}"
BUILD_SCRIPT = Path(__file__).with_name("build-guest.sh")
NAME_PREFIX = "vrt-"
URI = os.environ.get("VR_TEST_URI", "qemu:///system")

AGENT_BOOT_TIMEOUT_S = 90.0
SHUTDOWN_TIMEOUT_S = 60.0

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
_counter = itertools.count(1)


# How long an agent command waits for the agent to connect again (see Guest.agent).
AGENT_RECONNECT_S = 15.0


class GuestError(AssertionError):
    """The test bed could not get a guest into the state a test needs."""


@dataclass(frozen=True)
class ExecResult:
    exitcode: int
    stdout: str
    stderr: str


class Connection:
    """The test bed's libvirt connection: opened again when libvirtd was restarted."""

    def __init__(self, uri: str = URI) -> None:
        self.uri = uri
        self._conn = libvirt.open(uri)

    def _alive(self) -> bool:
        try:
            return bool(self._conn.isAlive() == 1)
        except libvirt.libvirtError:
            return False

    def current(self) -> Any:
        if not self._alive():
            deadline = time.monotonic() + 60
            while True:
                try:
                    self._conn = libvirt.open(self.uri)
                    break
                except libvirt.libvirtError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        return self._conn

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.current(), name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return getattr(self.current(), name)(*args, **kwargs)
            except libvirt.libvirtError:
                # isAlive() only turns false once a call has failed on the dead socket.
                if self._alive():
                    raise
                return getattr(self.current(), name)(*args, **kwargs)

        return call


def ensure_guest_built() -> None:
    """Build the guest kernel and initramfs into the cache folder unless already there."""
    subprocess.run(["bash", str(BUILD_SCRIPT), str(TESTBED_DIR)], check=True, timeout=600)


def ensure_guest_saved(conn: Any) -> SavedState:
    """The busybox guest saved running with its agent up and its disk not yet probed.

    Made once per build of the guest (about 10 s); each started test guest is
    restored from it (see testbed.saved).
    """

    def save(saved: SavedState) -> None:
        name = unique_name()
        folder = RUN_DIR / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for path in (TESTBED_DIR, RUN_DIR, folder):
                path.chmod(0o755)
            image = folder / "data.qcow2"
            make_data_image(image, "16M")
            xml = domain_xml(name, image, discard=True, console_log=folder / "console.log",
                             cmdline=f"{DEFAULT_CMDLINE} {DEFER_DISK}")  # fmt: skip
            conn.defineXML(xml)
            guest = Guest(conn, name, folder, image, None, persistent=True)
            guest.start()
            save_running(guest.dom, saved)
        finally:
            remove_domain(conn, name)
            shutil.rmtree(folder, ignore_errors=True)

    return ensure_saved(SAVED_DIR / "busybox", GUEST_DIR / "stamp", save)


def unique_name(prefix: str = NAME_PREFIX) -> str:
    """A domain name that carries this process's pid, so that a sweep can tell leftovers."""
    return f"{prefix}{os.getpid()}-{next(_counter)}"


def run_host(*argv: str, timeout: float = 120) -> str:
    """Run a host tool for the test bed (mkfs, qemu-img) and return its stdout."""
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout).stdout


def make_data_image(
    path: Path,
    size: str,
    *,
    backing: Path | None = None,
    files: Path | None = None,
    deleted: str | None = None,
    disk_format: str = "qcow2",
) -> None:
    """Create a qcow2 data disk holding an empty ext4 filesystem.

    With ``backing`` the filesystem goes into a base image at that path and
    ``path`` becomes an empty overlay over it. ``files`` is a folder whose
    contents are copied into the new filesystem (``mkfs.ext4 -d``); its file
    ``deleted`` is then removed by debugfs, its data left in the blocks it frees
    (see testbed.content). ``disk_format`` ``raw`` or ``vmdk`` (monolithicSparse)
    makes an imported guest's disk instead.
    """
    raw = path.with_suffix(".raw") if disk_format != "raw" else path.with_suffix(".mkfs")
    run_host("truncate", "-s", size, str(raw))
    # No lazy init: ext4lazyinit would write the image in the background and make
    # "byte-identical" assertions flaky.
    mkfs = ["mkfs.ext4", "-q", "-F", "-L", "data", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
    if files is not None:
        mkfs += ["-d", str(files)]
    run_host(*mkfs, str(raw))
    if deleted is not None:
        run_host("debugfs", "-w", "-R", f"rm /{deleted}", str(raw))
    if disk_format != "qcow2":
        assert backing is None, "the raw and VMDK test disks have no backing file"
        if disk_format == "raw":
            raw.rename(path)
            return
        run_host("qemu-img", "convert", "-f", "raw", "-O", disk_format, "-o",
                 "subformat=monolithicSparse", str(raw), str(path))  # fmt: skip
        raw.unlink()
        return
    bottom = backing or path
    run_host("qemu-img", "convert", "-O", "qcow2", str(raw), str(bottom))
    raw.unlink()
    if backing is not None:
        run_host(
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "qcow2", str(path)
        )


def domain_xml(
    name: str,
    data_image: Path,
    *,
    discard: bool,
    console_log: Path,
    disk_format: str = "qcow2",
    boot_dir: Path = GUEST_DIR,
    cmdline: str = DEFAULT_CMDLINE,
    memory_mib: int = 256,
) -> str:
    """The XML of a test guest: TCG, direct kernel boot, one virtio disk, an agent channel.

    ``boot_dir`` holds the kernel and initrd (the busybox guest's by default).
    """
    discard_attr = " discard='unmap'" if discard else ""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{bootable_kernel(boot_dir)}</kernel>
    <initrd>{boot_dir}/initrd.img</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='{disk_format}'{discard_attr}/>
      <source file='{escape(str(data_image))}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <serial type='file'>
      <source path='{escape(str(console_log))}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
    <!-- libvirt adds a USB controller by default: its BIOS handoff took 0.33 s of each boot. -->
    <controller type='usb' model='none'/>
  </devices>
</domain>
"""


@dataclass
class Guest:
    """A test guest: its domain, its folder and its data image (an overlay if backing_image)."""

    conn: Any
    name: str
    folder: Path
    data_image: Path
    backing_image: Path | None
    persistent: bool
    # SHA-256 of the files the disk was made with (testbed.content), keyed like data.checksums.
    content_sums: dict[str, str] = field(default_factory=dict)

    @property
    def dom(self) -> Any:
        # Looked up each time: a cached object would die with a restarted libvirtd.
        return self.conn.lookupByName(self.name)

    @property
    def console_log(self) -> Path:
        return self.folder / "console.log"

    def is_running(self) -> bool:
        return bool(self.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING)

    def is_off(self) -> bool:
        try:
            return bool(self.dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF)
        except libvirt.libvirtError as exc:
            # A transient domain vanishes when it stops.
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return True
            raise

    def start(self, *, wait_agent: bool = True) -> None:
        self.dom.create()
        if wait_agent:
            self.wait_agent()

    def resume_saved(self, saved: SavedState) -> None:
        """Start the guest from ``saved`` instead of booting it (see testbed.saved)."""
        restore_as(self.conn, self.dom, saved, self.folder / "state.restore")
        self.wait_agent()
        set_guest_clock(self.agent)
        self.attach_disk()

    def attach_disk(self) -> None:
        """Probe the data disk and mount it at /data in a guest restored before either."""
        self.exec("/sbin/attach-disk", timeout=60)

    def wait_agent(self, timeout: float = AGENT_BOOT_TIMEOUT_S) -> None:
        """Poll guest-ping until the agent answers, with a deadline."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self.agent("guest-ping", timeout=2)
                return
            except libvirt.libvirtError as exc:
                last = exc
                if not self.is_running():
                    break
            time.sleep(0.5)
        raise GuestError(
            f"{self.name}: agent did not answer within {timeout:g} s ({last}); "
            f"console: {self._console_tail()}"
        )

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Shut the guest down through its agent and wait until it is off."""
        try:
            self.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
        except libvirt.libvirtError as exc:
            # The guest may power off before its agent answers: libvirt then reports the
            # channel's end, and whether the guest goes off is what wait_off tells.
            if "End of file from agent socket" not in str(exc):
                raise
        self.wait_off(timeout)

    def wait_off(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_off():
                return
            time.sleep(0.2)
        raise GuestError(f"{self.name}: still not off after {timeout:g} s")

    def restart(self) -> None:
        """A cold restart: agent shutdown, wait until off, start, wait for the agent."""
        self.shutdown()
        self.start()

    def files_once_off(
        self, root: str = MOUNTPOINT, mountpoint: str = MOUNTPOINT
    ) -> dict[str, str]:
        """Shut the guest down and read the files under ``root`` from its image.

        What a cold restart and testbed.data.checksums would show, read on the host
        (testbed.content.files_in_image) without the boot's seconds of a core.
        """
        self.shutdown()
        return files_in_image(self.data_image, self.folder / "files-once-off", root, mountpoint)

    def agent(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: int = 10
    ) -> Any:
        """Send one guest agent command and return its ``return`` value.

        While libvirt says the agent is not connected (the guest's side of the channel
        closed and not yet reopened: seen once right after a job started the guest again)
        the command was never sent: it is sent again, for AGENT_RECONNECT_S at most.
        """
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        deadline = time.monotonic() + AGENT_RECONNECT_S
        while True:
            try:
                reply = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(request), timeout, 0)
                break
            except libvirt.libvirtError as exc:
                not_connected = "agent is not connected" in str(exc)
                if not not_connected or time.monotonic() > deadline or not self.is_running():
                    raise
                time.sleep(0.2)
        return json.loads(reply)["return"]

    def exec(self, script: str, *, timeout: float = 120, check: bool = True) -> ExecResult:
        """Run a busybox shell script in the guest through guest-exec; wait with a deadline."""
        pid = self.agent(
            "guest-exec",
            {
                "path": "/bin/sh",
                "arg": ["-c", script],
                "capture-output": True,
            },
        )["pid"]
        deadline = time.monotonic() + timeout
        # Each poll is a libvirt call and an agent command the guest answers under TCG:
        # quick at first (most scripts end in well under a second), then backing off to 0.25 s.
        pause = 0.02
        while True:
            status = self.agent("guest-exec-status", {"pid": pid})
            if status["exited"]:
                break
            if time.monotonic() > deadline:
                raise GuestError(f"{self.name}: {script!r} still running after {timeout:g} s")
            time.sleep(pause)
            pause = min(pause * 1.5, 0.25)
        result = ExecResult(
            exitcode=int(status.get("exitcode", -1)),
            stdout=base64.b64decode(status.get("out-data", "")).decode(errors="replace"),
            stderr=base64.b64decode(status.get("err-data", "")).decode(errors="replace"),
        )
        if check and result.exitcode != 0:
            raise GuestError(f"{self.name}: {script!r} exited {result.exitcode}: {result.stderr}")
        return result

    def write_file(self, path: str, data: bytes, *, chunk: int = 64 * 1024) -> None:
        """Write ``data`` to ``path`` in the guest with guest-file-open/write/close.

        Under TCG qemu-ga parses a 256 KiB write for longer than libvirt waits and
        is then marked unavailable; 64 KiB pieces run at about 4 MiB/s.
        """
        handle = self.agent("guest-file-open", {"path": path, "mode": "w"})
        try:
            for start in range(0, len(data), chunk):
                piece = base64.b64encode(data[start : start + chunk]).decode()
                self.agent("guest-file-write", {"handle": handle, "buf-b64": piece})
        finally:
            self.agent("guest-file-close", {"handle": handle})

    def remove(self) -> None:
        """Destroy and undefine the domain and delete its folder; safe when half gone."""
        remove_domain(self.conn, self.name)
        shutil.rmtree(self.folder, ignore_errors=True)
        for image in (self.data_image, self.backing_image):
            if image is not None:
                image.unlink(missing_ok=True)

    def _console_tail(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-800:]
        except OSError:
            return "(no console log)"


def create_guest(
    conn: Any,
    *,
    name: str | None = None,
    data_size: str = "1G",
    discard: bool = True,
    backing: bool = False,
    start: bool = True,
    persistent: bool = True,
    files: Path | None = None,
    content: Content | None = None,
    image_dir: Path | None = None,
    disk_format: str = "qcow2",
) -> Guest:
    """Create a test guest with an ext4 data disk of ``data_size``, optionally started.

    Args:
        conn: An open libvirt connection.
        name: The domain name; a unique ``vrt-<pid>-<n>`` by default.
        data_size: Virtual size of the data disk (``truncate -s`` syntax).
        discard: Give the disk ``discard='unmap'`` so that trims free host space.
        backing: Make the data disk an overlay over a backing file holding the filesystem.
        start: Start the guest and wait until its agent answers.
        persistent: Define the domain; otherwise create it transient (started at once).
        files: A host folder copied into the new filesystem.
        content: Files written on the host for the new filesystem, some deleted (see
            testbed.content); their checksums are the guest's ``content_sums``.
        image_dir: Where the data image goes (a small tmpfs, say); the guest's folder by default.
        disk_format: ``qcow2``, or ``raw`` or ``vmdk`` for a guest as an import leaves it
            (``data.raw``, ``data.vmdk``).
    """
    name = name or unique_name()
    folder = RUN_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    # QEMU runs as libvirt-qemu and must reach every folder above the image.
    for path in (TESTBED_DIR, RUN_DIR, folder):
        path.chmod(0o755)
    data_image = (image_dir or folder) / f"data.{disk_format}"
    backing_image = (image_dir or folder) / "base.qcow2" if backing else None
    sums: dict[str, str] = {}
    deleted = None
    if content is not None:
        assert files is None, "give files or content, not both"
        files = folder / "content"
        sums = content.write(files)
        deleted = DELETED_NAME if content.deleted_mib else None
    make_data_image(data_image, data_size, backing=backing_image, files=files,
                    deleted=deleted, disk_format=disk_format)  # fmt: skip
    if content is not None:
        shutil.rmtree(folder / "content")
    xml = domain_xml(name, data_image, discard=discard, console_log=folder / "console.log",
                     disk_format=disk_format)  # fmt: skip
    guest = Guest(conn, name, folder, data_image, backing_image, persistent, sums)
    try:
        conn.defineXML(xml)
        if start or not persistent:
            guest.resume_saved(ensure_guest_saved(conn))
        if not persistent:
            # Undefined while it runs, the domain is transient: gone when it stops.
            guest.dom.undefineFlags(0)
    except BaseException:
        guest.remove()
        raise
    return guest


def remove_domain(conn: Any, name: str) -> None:
    """Destroy and undefine a domain by name, whatever state it is in."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass
    try:
        if dom.isPersistent():
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    except libvirt.libvirtError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str, prefix: str) -> int | None:
    rest = name[len(prefix) :]
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def sweep_leftovers(conn: Any, prefix: str = NAME_PREFIX) -> list[str]:
    """Remove the test guests (domains and folders) of test runs that no longer live."""
    removed = []
    names = {dom.name() for dom in conn.listAllDomains(0)}
    if RUN_DIR.is_dir():
        names |= {p.name for p in RUN_DIR.iterdir()}
    for name in sorted(names):
        if not name.startswith(prefix):
            continue
        pid = _owner_pid(name, prefix)
        # Our own guests are alive too: their fixtures remove them.
        if pid is not None and _pid_alive(pid):
            continue
        remove_domain(conn, name)
        shutil.rmtree(RUN_DIR / name, ignore_errors=True)
        removed.append(name)
    return removed


def restart_libvirtd() -> None:
    """Kill libvirtd hard and start it again (by hand, as the test bed runs it)."""
    subprocess.run(["pkill", "-KILL", "-x", "libvirtd"], check=True, timeout=30)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True,
                         check=False).returncode == 0:  # fmt: skip
        assert time.monotonic() < deadline, "libvirtd did not die"
        time.sleep(0.1)
    subprocess.run(["libvirtd", "-d"], check=True, timeout=30)
    deadline = time.monotonic() + 60
    while subprocess.run(["virsh", "-c", URI, "version"], capture_output=True,
                         check=False).returncode != 0:  # fmt: skip
        assert time.monotonic() < deadline, "libvirtd did not come back"
        time.sleep(0.2)
