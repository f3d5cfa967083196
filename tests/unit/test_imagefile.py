"""Host file operations on real files: names, metadata, the swap and its backup."""

from __future__ import annotations

import os
from pathlib import Path

from virt_reclaim import imagefile


def test_temporary_and_backup_names_sit_beside_the_image() -> None:
    assert imagefile.temp_path("/v/disk.qcow2", "abc") == "/v/.disk.qcow2.virt-reclaim-abc.tmp"
    assert imagefile.backup_path("/v/disk.qcow2", 0) == (
        "/v/disk.qcow2.virt-reclaim-backup-19700101T000000Z"
    )


def test_copy_metadata_keeps_owner_mode_and_xattrs_but_not_libvirts(tmp_path: Path) -> None:
    original, new = tmp_path / "orig", tmp_path / "new"
    original.write_bytes(b"o")
    new.write_bytes(b"n")
    os.chown(original, 64055, 107)
    os.chmod(original, 0o640)
    os.setxattr(original, "user.owner-note", b"finance")
    os.setxattr(original, "trusted.libvirt.security.dac", b"+0:+0")

    imagefile.copy_metadata(str(original), str(new))

    st = os.stat(new)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (64055, 107, 0o640)
    assert os.getxattr(new, "user.owner-note") == b"finance"
    assert "trusted.libvirt.security.dac" not in os.listxattr(new)


def test_swap_replaces_atomically_and_can_keep_the_original(tmp_path: Path) -> None:
    original, new = tmp_path / "disk.qcow2", tmp_path / ".disk.tmp"
    original.write_bytes(b"old image")
    new.write_bytes(b"new image")
    old_inode = os.stat(original).st_ino
    backup = tmp_path / "disk.qcow2.backup"

    imagefile.swap_in(str(new), str(original), backup=str(backup))

    assert original.read_bytes() == b"new image"
    assert backup.read_bytes() == b"old image"
    assert os.stat(backup).st_ino == old_inode
    assert not new.exists()


def test_swap_without_backup_leaves_one_file(tmp_path: Path) -> None:
    original, new = tmp_path / "disk.qcow2", tmp_path / ".disk.tmp"
    original.write_bytes(b"old")
    new.write_bytes(b"new")
    imagefile.swap_in(str(new), str(original), backup=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.qcow2"]
    assert original.read_bytes() == b"new"


def test_remove_quietly(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    assert imagefile.remove_quietly(str(path))
    assert not imagefile.remove_quietly(str(path))
