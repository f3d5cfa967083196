"""Imported guests on the real libvirtd: raw and VMDK disks converted, discard turned on, crashes.

- A guest that boots from a raw and one from a VMDK disk are converted by
  ``run --convert`` and boot again from qcow2 with the same checksums in /data.
- A guest without discard is reclaimed with ``--enable-discard``: it comes back with
  discard in its live XML (and its kernel sees it), and its next job chooses trim.
- SIGKILL before every step of a conversion, then ``recover``: the definition names
  a file that exists and holds the guest's bytes, and nothing else is left. Shut-off
  guests (nothing to boot) for every step; one running guest for the step where
  recovery must start it on its new image.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest

from testbed import content, data
from testbed.guests import Guest
from testbed.reclaim import (
    leftovers,
    qemu_img_check_clean,
    reclaim,
    recover_json,
    start_reclaim,
    wait_for_file,
)

pytestmark = pytest.mark.guest
MIB = 1024 * 1024


def persistent_disk(guest: Guest) -> tuple[str, str, str | None, str | None]:
    """The data disk in the persistent definition: (source, format, discard, detect_zeroes)."""
    return _disk(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def live_disk(guest: Guest) -> tuple[str, str, str | None, str | None]:
    return _disk(guest.dom.XMLDesc(0))


def _disk(xml: str) -> tuple[str, str, str | None, str | None]:
    disk = ET.fromstring(xml).find("./devices/disk")  # noqa: S314 - our own test domain
    assert disk is not None
    driver, source = disk.find("driver"), disk.find("source")
    assert driver is not None and source is not None
    return (source.get("file", ""), driver.get("type", ""), driver.get("discard"),
            driver.get("detect_zeroes"))  # fmt: skip


def guest_sha256(image: Path, fmt: str) -> str:
    """SHA-256 of what the guest sees of ``image`` (read as ``fmt``, never probed)."""
    seen = image.with_name(image.name + ".seen")
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(seen)],
                   check=True, timeout=120)  # fmt: skip
    try:
        digest = hashlib.sha256()
        with seen.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    finally:
        seen.unlink()


def image_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("data."))


@pytest.mark.parametrize("disk_format", ["raw", "vmdk"])
def test_an_imported_guest_is_converted_and_boots_from_qcow2(
    make_guest: Callable[..., Guest], tmp_path: Path, disk_format: str
) -> None:
    """Up to a minute under load: the job converts the disk and boots the guest from it."""
    guest = make_guest(data_size="96M", disk_format=disk_format)
    data.write_text(guest, "/data/app.log", 4)
    data.write_random(guest, "/data/blob.bin", 2)
    sums = data.checksums(guest)
    new = guest.folder / "data.qcow2"

    run = reclaim(guest.name, "--convert", "--free-space", "none",
                  "--state-dir", str(tmp_path / "state"))  # fmt: skip

    assert run.exitcode == 0, run.stderr
    assert (run.result["outcome"], run.result["mode"]) == ("reclaimed", "convert"), run.result
    [disk] = run.result["disks"]
    assert (disk["format"], disk["converted_to"]) == (disk_format, str(new))
    assert live_disk(guest)[:2] == persistent_disk(guest)[:2] == (str(new), "qcow2")
    assert guest.is_running()
    guest.wait_agent()
    assert data.checksums(guest) == sums
    assert image_files(guest.folder) == ["data.qcow2"]  # the original is gone
    assert leftovers(guest.folder) == []
    qemu_img_check_clean(new)


def test_discard_turned_on_makes_the_next_job_trim(
    make_guest: Callable[..., Guest], tmp_path: Path
) -> None:
    """Up to a minute under load: two jobs, each restarting the guest."""
    guest = make_guest(data_size="96M", discard=False)
    data.write_text(guest, "/data/app.log", 2)
    sums = data.checksums(guest)
    state = ["--state-dir", str(tmp_path / "state")]

    run = reclaim(guest.name, "--enable-discard", "--free-space", "none", "--min-gain", "0",
                  *state)  # fmt: skip

    assert run.exitcode == 0, run.stderr
    assert run.result["outcome"] == "reclaimed", run.result
    [disk] = run.result["disks"]
    assert (disk["discard"], disk["discard_enabled"]) == (False, True)
    assert live_disk(guest)[2:] == persistent_disk(guest)[2:] == ("unmap", "unmap")
    guest.wait_agent()
    assert data.checksums(guest) == sums
    # The restart picked it up: a trim in the guest now frees space on the host.
    data.write_deleted_random(guest, 8)
    before = guest.data_image.stat().st_blocks * 512
    guest.agent("guest-fstrim", timeout=60)
    assert before - guest.data_image.stat().st_blocks * 512 >= 4 * MIB

    again = reclaim(guest.name, "--dry-run", *state)

    assert again.exitcode == 0, again.stderr
    assert again.result["free_space_plan"].startswith("trim"), again.result


# Every step a conversion of a shut-off guest passes; the kill comes just before it.
CRASH_POINTS = ["shutdown", "guard", "preflight:2", "rewrite", "verify", "swap", "define",
                "restore", "cleanup"]  # fmt: skip
# From these on the definition names the new image: recovery finishes the job.
FINISHED_AT = ("restore", "cleanup")


def kill_at(guest: Guest, point: str, state: Path, marker: Path) -> None:
    job = start_reclaim(guest.name, "--convert", "--free-space", "none", "--state-dir",
                        str(state), env={"VIRT_RECLAIM_TEST_PAUSE": point,
                                         "VIRT_RECLAIM_TEST_PAUSE_FILE": str(marker)})  # fmt: skip
    try:
        wait_for_file(marker, 120, job)
    finally:
        job.send_signal(signal.SIGKILL)
        job.communicate(timeout=60)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_each_conversion_step_then_recover(
    make_guest: Callable[..., Guest], tmp_path: Path, point: str
) -> None:
    guest = make_guest(data_size="64M", disk_format="raw", start=False, files=_files(tmp_path))
    raw, new = guest.data_image, guest.folder / "data.qcow2"
    seen = guest_sha256(raw, "raw")
    state = tmp_path / "state"

    kill_at(guest, point, state, tmp_path / "paused")
    [recovered] = recover_json(state)

    finished = point in FINISHED_AT
    assert recovered["step"] == point.split(":", maxsplit=1)[0]
    assert recovered["outcome"] == ("reclaimed" if finished else "failed"), recovered
    source, fmt, _, _ = persistent_disk(guest)
    assert (source, fmt) == ((str(new), "qcow2") if finished else (str(raw), "raw"))
    assert image_files(guest.folder) == [Path(source).name]
    assert guest_sha256(Path(source), fmt) == seen
    assert leftovers(guest.folder) == []
    assert guest.is_off()
    assert recover_json(state) == [], "a second recover found work"


def test_sigkill_of_a_running_guests_conversion_then_recover_starts_it_on_qcow2(
    make_guest: Callable[..., Guest], tmp_path: Path
) -> None:
    guest = make_guest(data_size="64M", disk_format="raw")
    data.write_text(guest, "/data/app.log", 2)
    sums = data.checksums(guest)
    state = tmp_path / "state"

    # Killed once the definition names the new image, with the guest still off.
    kill_at(guest, "restore", state, tmp_path / "paused")
    assert guest.is_off()
    [recovered] = recover_json(state)

    assert recovered["outcome"] == "reclaimed", recovered
    assert any("started the guest again" in a for a in recovered["actions"])
    assert live_disk(guest)[:2] == (str(guest.folder / "data.qcow2"), "qcow2")
    guest.wait_agent()
    assert data.checksums(guest) == sums
    assert image_files(guest.folder) == ["data.qcow2"]


def _files(tmp_path: Path) -> Path:
    """A few files for a shut-off guest's filesystem (mkfs.ext4 -d): data to keep intact."""
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "app.log").write_bytes(content.log_text(2 * 1024 * 1024))
    (folder / "blob.bin").write_bytes(bytes(range(256)) * 4096)
    return folder
