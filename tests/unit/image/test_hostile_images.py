"""Images built as an attacker would: no guest byte chooses a format or a host file.

A guest owns what its disk holds, and an overlay made by older tools may not record
its backing file's format. qemu would then guess that format from the backing
file's bytes: a raw base into which the guest wrote a qcow2 header naming a host
file would be read as that qcow2, and the host file opened as its backing. The
canary is a regular file watched with inotify (QEMU refuses a FIFO before opening
it, so a FIFO would prove nothing).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from fakes import FakeDisk, FakeDomain, OpenWatch, sh
from virt_reclaim.image.imagefile import NewImage
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.context import Step
from virt_reclaim.job.frame import ReclaimJob
from virt_reclaim.job.results import Outcome
from virt_reclaim.job.settings import JobSettings
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import DomainState

MIB = 1024 * 1024
_BACKING_FORMAT_EXTENSION = bytes.fromhex("e2792aca")  # the qcow2 header extension's magic
_UNKNOWN_EXTENSION = bytes.fromhex("7672a0a0")  # qemu keeps unknown ones and ignores them


def guest_written_qcow2_header(raw: Path, names: Path) -> None:
    """A raw disk whose guest wrote, at its start, a qcow2 header with ``names`` as backing."""
    evil = raw.with_name("evil.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(names), "-F", "raw", str(evil), "64M")
    sh("truncate", "-s", "64M", str(raw))
    with raw.open("r+b") as disk:
        disk.write(evil.read_bytes())
    evil.unlink()


def legacy_overlay(overlay: Path, base: Path) -> None:
    """An overlay over ``base`` whose header records no backing format (as old tools made)."""
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
    header = overlay.read_bytes()
    assert header.count(_BACKING_FORMAT_EXTENSION) == 1
    overlay.write_bytes(header.replace(_BACKING_FORMAT_EXTENSION, _UNKNOWN_EXTENSION))
    info = sh("qemu-img", "info", "-f", "qcow2", str(overlay))
    assert "backing file format" not in info, info


def run(domain: FakeDomain, state: Path) -> object:
    job = ReclaimJob(
        domain, QemuImg(priority=None), JobSettings(min_gain=0),
        images_of_other_domains=dict, journal=Journal(state),
    )  # fmt: skip
    return job.run()


def test_a_legacy_overlay_over_a_guest_written_header_never_opens_the_host_file(
    tmp_path: Path,
) -> None:
    canary = tmp_path / "host-canary"
    canary.write_bytes(b"host data\n" * 1000)
    base = tmp_path / "base.raw"
    guest_written_qcow2_header(base, canary)
    overlay = tmp_path / "disk.qcow2"
    legacy_overlay(overlay, base)
    before = overlay.read_bytes(), base.read_bytes()
    domain = FakeDomain([FakeDisk("vda", overlay)], power=DomainState.SHUTOFF)
    watch = OpenWatch(canary)
    try:
        result = run(domain, tmp_path / "state")
        opened = watch.opened()
    finally:
        watch.close()

    assert not opened, "the host file a guest's bytes named was opened"
    assert result.outcome is Outcome.SKIPPED, result.reason  # type: ignore[attr-defined]
    [skipped] = result.skipped_disks  # type: ignore[attr-defined]
    assert "but not its format" in skipped.reason, skipped.reason
    assert f"qemu-img rebase -u -F FORMAT -b {base} {overlay}" in skipped.reason
    assert (overlay.read_bytes(), base.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["host-canary", "base.raw", "disk.qcow2", "state"]
    )


def test_a_backing_format_that_differs_from_the_definition_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    sh("truncate", "-s", "64M", str(base))
    overlay = tmp_path / "disk.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
    backing_xml = (
        f"<backingStore type='file'><format type='qcow2'/><source file='{base}'/>"
        "<backingStore/></backingStore>"
    )
    domain = FakeDomain([FakeDisk("vda", overlay, extra_xml=backing_xml)],
                        power=DomainState.SHUTOFF)  # fmt: skip

    result = run(domain, tmp_path / "state")

    assert result.outcome is Outcome.SKIPPED, result.reason  # type: ignore[attr-defined]
    [skipped] = result.skipped_disks  # type: ignore[attr-defined]
    assert "the definition says qcow2 for the backing file" in skipped.reason, skipped.reason


def test_a_disk_whose_source_is_a_symlink_is_left_as_it_is(tmp_path: Path) -> None:
    """A rename over the link would replace it with a file and never free its target."""
    target = tmp_path / "elsewhere.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(target), "64M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 8M", str(target))
    link = tmp_path / "disk.qcow2"
    link.symlink_to(target)
    before = target.read_bytes()
    domain = FakeDomain([FakeDisk("vda", link)], power=DomainState.SHUTOFF)

    result = run(domain, tmp_path / "state")

    assert result.outcome is Outcome.SKIPPED, result.reason  # type: ignore[attr-defined]
    [skipped] = result.skipped_disks  # type: ignore[attr-defined]
    assert f"the source is a symlink to {target}" in skipped.reason, skipped.reason
    assert link.is_symlink() and target.read_bytes() == before


@pytest.mark.parametrize(
    ("mode", "owner", "reason"),
    [
        (0o777, 0, "is writable by every user (mode 0777)"),
        (0o775, 0, "is writable by group 65534"),
        (0o755, 65534, "belongs to uid 65534, who may write it"),
    ],
)
def test_an_image_folder_another_user_may_write_is_refused_before_the_shutdown(
    tmp_path: Path, mode: int, owner: int, reason: str
) -> None:
    """The job creates, renames and deletes there as root: someone could plant a link."""
    folder = tmp_path / "images"
    folder.mkdir()
    image = folder / "disk.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M")
    os.chown(folder, owner, 65534 if mode & 0o020 else 0)
    folder.chmod(mode)
    domain = FakeDomain([FakeDisk("vda", image)])

    result = run(domain, tmp_path / "state")

    assert result.outcome is Outcome.SKIPPED, result.reason  # type: ignore[attr-defined]
    assert reason in result.reason, result.reason  # type: ignore[attr-defined]
    assert not any(c.startswith("shutdown") for c in domain.calls)
    assert sorted(p.name for p in folder.iterdir()) == ["disk.qcow2"]


class TakenOverConvert(QemuImg):
    """qemu-img writes the job's new file; then someone puts a link to a host file at its name."""

    def __init__(self, victim: Path) -> None:
        super().__init__(priority=None)
        self.victim = victim

    def convert(self, source: str, target: NewImage, **options: Any) -> None:
        super().convert(source, target, **options)
        os.unlink(target.path)
        os.symlink(self.victim, target.path)


def written_image(path: Path) -> Path:
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 8M", "-c", "write -P 0 8M 8M", str(path))
    return path


def test_a_link_put_at_the_new_image_s_name_while_qemu_img_writes_is_never_followed(
    tmp_path: Path,
) -> None:
    """Neither renamed over the original, nor given its owner and mode, nor removed."""
    image = written_image(tmp_path / "disk.qcow2")
    victim = tmp_path / "host-file"
    victim.write_bytes(b"host data")
    victim.chmod(0o600)
    before = image.read_bytes()
    domain = FakeDomain([FakeDisk("vda", image)])
    job = ReclaimJob(
        domain, TakenOverConvert(victim), JobSettings(min_gain=0),
        images_of_other_domains=dict, journal=Journal(tmp_path / "state"),
    )  # fmt: skip

    result = job.run()

    assert result.outcome is Outcome.FAILED, result.reason
    assert "was replaced while the job wrote it" in result.reason, result.reason
    assert image.read_bytes() == before
    assert victim.read_bytes() == b"host data" and victim.stat().st_mode & 0o777 == 0o600
    [link] = [p for p in tmp_path.iterdir() if p.is_symlink()]
    assert link.resolve() == victim  # not ours to delete
    assert domain.power is DomainState.RUNNING


def test_a_link_planted_at_the_new_image_s_name_is_never_written_through(tmp_path: Path) -> None:
    """The name is known once the journal has it; the creation fails instead of following it."""
    image = written_image(tmp_path / "disk.qcow2")
    victim = tmp_path / "host-file"
    victim.write_bytes(b"host data")
    before = image.read_bytes()
    domain = FakeDomain([FakeDisk("vda", image)])
    state = tmp_path / "state"

    def plant(step: Step) -> None:
        if step is Step.REWRITE:
            [journaled] = Journal(state).unfinished()
            os.symlink(victim, journaled.disks[0].temp_path)

    job = ReclaimJob(
        domain, QemuImg(priority=None), JobSettings(min_gain=0),
        images_of_other_domains=dict, journal=Journal(state), before_step=plant,
    )  # fmt: skip

    result = job.run()

    assert result.outcome is Outcome.FAILED, result.reason
    assert "cannot create" in result.reason and "File exists" in result.reason, result.reason
    assert image.read_bytes() == before
    assert victim.read_bytes() == b"host data"
    assert domain.power is DomainState.RUNNING
