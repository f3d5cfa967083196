"""Host file operations on real files: names, metadata, the swap and its backup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virt_reclaim.image import imagefile


def new_with(path: Path, content: bytes) -> imagefile.NewImage:
    new = imagefile.NewImage(str(path))
    os.write(new.fd, content)
    return new


def test_temporary_and_backup_names_sit_beside_the_image() -> None:
    assert imagefile.temp_path("/v/disk.qcow2", "abc") == "/v/.disk.qcow2.virt-reclaim-abc.tmp"
    assert imagefile.backup_path("/v/disk.qcow2", 0) == (
        "/v/disk.qcow2.virt-reclaim-backup-19700101T000000Z"
    )


def test_new_image_takes_owner_mode_and_xattrs_but_not_libvirts(tmp_path: Path) -> None:
    original, new = tmp_path / "orig", tmp_path / "new"
    original.write_bytes(b"o")
    os.chown(original, 64055, 107)
    os.chmod(original, 0o640)
    os.setxattr(original, "user.owner-note", b"finance")
    os.setxattr(original, "trusted.libvirt.security.dac", b"+0:+0")

    image = new_with(new, b"n")
    assert os.stat(new).st_mode & 0o7777 == 0o600
    image.take_metadata_of(str(original))

    st = os.stat(new)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (64055, 107, 0o640)
    assert os.getxattr(new, "user.owner-note") == b"finance"
    assert "trusted.libvirt.security.dac" not in os.listxattr(new)


def test_swap_replaces_atomically_and_can_keep_the_original(tmp_path: Path) -> None:
    original, new = tmp_path / "disk.qcow2", tmp_path / ".disk.tmp"
    original.write_bytes(b"old image")
    image = new_with(new, b"new image")
    old_inode = os.stat(original).st_ino
    backup = tmp_path / "disk.qcow2.backup"

    imagefile.swap_in(image, str(original), backup=str(backup))

    assert original.read_bytes() == b"new image"
    assert backup.read_bytes() == b"old image"
    assert os.stat(backup).st_ino == old_inode
    assert not new.exists()


def test_swap_without_backup_leaves_one_file(tmp_path: Path) -> None:
    original, new = tmp_path / "disk.qcow2", tmp_path / ".disk.tmp"
    original.write_bytes(b"old")
    imagefile.swap_in(new_with(new, b"new"), str(original), backup=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.qcow2"]
    assert original.read_bytes() == b"new"


def test_remove_quietly(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    assert imagefile.remove_quietly(str(path))
    assert not imagefile.remove_quietly(str(path))


def test_a_new_image_is_never_created_through_a_planted_file_or_link(tmp_path: Path) -> None:
    """What an attacker plants at the name beforehand makes the creation fail, untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link, planted = tmp_path / "link", tmp_path / "planted"
    link.symlink_to(victim)
    planted.write_bytes(b"theirs")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "would-be-created")

    for name in (link, planted, dangling):
        with pytest.raises(OSError):
            imagefile.NewImage(str(name))
    assert victim.read_bytes() == b"precious"
    assert planted.read_bytes() == b"theirs"
    assert not (tmp_path / "would-be-created").exists()


def test_a_name_taken_over_is_neither_swapped_in_nor_removed(tmp_path: Path) -> None:
    """A link put in place of the job's file after its creation: refused, left alone."""
    original, temp, victim = tmp_path / "disk.qcow2", tmp_path / ".disk.tmp", tmp_path / "victim"
    original.write_bytes(b"old")
    victim.write_bytes(b"precious")
    image = new_with(temp, b"new")
    temp.unlink()
    temp.symlink_to(victim)

    assert not image.is_named()
    with pytest.raises(imagefile.NotOurs):
        imagefile.swap_in(image, str(original), backup=None)
    assert original.read_bytes() == b"old"
    assert not image.remove()
    assert temp.is_symlink() and victim.read_bytes() == b"precious"
